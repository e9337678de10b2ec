"""The largest micro-batch, or packed row, whose predicted need fits a memory: searches over a function that
simulates one size at a time (each simulation runs a forward and backward on fake tensors, so the searches
take as few as they can)."""

from __future__ import annotations


def largest_row(needed_at, memory: int, known: tuple[int, int], limit: int = 1 << 20) -> int:
    """The largest packed row (tokens) whose predicted need fits `memory` (0 if none does), to within 1 %:
    doubling from a known point until a row does not fit, then, between the longest that fits and the shortest
    that does not, the line through their needs (near-straight under a flash kernel; the math kernel's T^2
    attention bends it) guesses the answer and the row 1 % beyond that guess checks it."""
    tokens, peak = known
    low, high = ((tokens, peak), None) if peak <= memory else ((0, 0), (tokens, peak))
    while high is None:
        if low[0] >= limit:
            return limit
        candidate = min(2 * low[0], limit)
        need = needed_at(candidate)
        low, high = ((candidate, need), None) if need <= memory else (low, (candidate, need))
    while high[0] - low[0] > (step := max(1, low[0] // 100)):
        slope = (high[1] - low[1]) / (high[0] - low[0])
        guess = low[0] + int((memory - low[1]) / slope) if slope > 0 else (low[0] + high[0]) // 2
        guess = min(max(guess, low[0] + step), high[0] - step)
        need = needed_at(guess)
        if need <= memory:
            low = (guess, need)
            beyond = min(guess + step, high[0])  # the guess fits: does the row 1 % longer?
        else:
            high = (guess, need)
            beyond = max(guess - step, low[0])  # it does not: does the row 1 % shorter?
        if low[0] < beyond < high[0]:
            need = needed_at(beyond)
            low, high = ((beyond, need), high) if need <= memory else (low, (beyond, need))
    return low[0]


def largest_batch(needed_at, memory: int, known: tuple[int, int], limit: int = 4096) -> int:
    """The largest batch size whose predicted need fits `memory` (0 if not even one example fits). Memory
    grows about linearly with the batch, so two points (`known` is one: batch, need) give a line, and its
    guess is taken when it fits. Where it does not (the allocator's rounding bends the line), lines through
    batch 1 and each failed guess (secant steps) find a batch that fits, and bisection closes the gap to the
    smallest that failed, to within 1/16."""
    one = needed_at(1)
    if one > memory:
        return 0

    def secant(batch: int, need: int) -> int:
        return max(1, 1 + (memory - one) * (batch - 1) // max(need - one, 1))

    other, other_need = known if known[0] > 1 else (2, needed_at(2))
    guess = min(limit, secant(other, other_need))
    need = needed_at(guess)
    if need <= memory:
        return guess
    fails = guess
    while (guess := min(fails - 1, secant(fails, need))) > 1 and (need := needed_at(guess)) > memory:
        fails = guess
    fits = guess
    while fails - fits > max(1, fits // 16):
        middle = (fits + fails) // 2
        fits, fails = (middle, fails) if needed_at(middle) <= memory else (fits, middle)
    return fits
