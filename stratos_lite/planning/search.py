"""The largest micro-batch, or packed row, whose predicted need fits a memory: searches over a function that
simulates one size at a time (each simulation runs a forward and backward on fake tensors, so the searches
take as few as they can)."""

from __future__ import annotations


def largest_row(needed_at, memory: int, known: tuple[int, int], limit: int = 1 << 20) -> int:
    """The largest packed row (tokens) whose predicted need fits `memory` (0 if none does): doubling from a
    known point, then bisection to within 1 %. Attention under the math kernel grows as T^2, so no line."""
    tokens, peak = known
    low, high = (tokens, None) if peak <= memory else (0, tokens)
    while high is None:
        if low >= limit:
            return limit
        candidate = min(2 * low, limit)
        if needed_at(candidate) <= memory:
            low = candidate
        else:
            high = candidate
    while high - low > max(1, low // 100):
        middle = (low + high) // 2
        low, high = (middle, high) if needed_at(middle) <= memory else (low, middle)
    return low


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
