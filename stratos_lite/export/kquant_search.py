"""The searches llama.cpp's K-quants run to choose each sub-block's scale (ggml-quants.c), vectorised.

Every function takes a sub-block per column: x is (values, sub-blocks), so that a sum over a sub-block runs
down a column one term after another, in the C loop's order. Float addition is not associative and the
choice between two candidate scales can turn on the last bit of such a sum, so the order matters for the
bytes. Where the C code walks a sub-block's values one at a time, each step depending on the last (the
refinements of make_q3_quants and make_qp_quants), the loop here runs over the values, each step working on
every sub-block at once.

`weights` are the per-value importances the search minimises the weighted error under: llama.cpp's defaults
without an importance matrix, or the matrix's values scaled as its quantize_row_*_impl scales them.
"""

from __future__ import annotations

import torch

F32 = torch.float32
TINY = 1e-15  # GROUP_MAX_EPS: a sub-block whose largest magnitude is below this is all zeros
REFINE_PASSES = 5  # make_q3_quants / make_qp_quants: at most five passes over a sub-block's values


def sequential_sum(terms: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum along `dim` one term after another, as a C loop accumulates."""
    first, second, *rest = terms.unbind(dim)
    total = torch.add(first, second)
    for term in rest:
        total += term
    return total


def nearest(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even, kept as float32 (the values are small integers)."""
    return torch.round(values)


def exact_sqrt(values: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's vectorised float32 sqrt may be off by an ulp; the float64 root
    rounded to float32 is exact."""
    return torch.sqrt(values.double()).float()


def fp16(values: torch.Tensor) -> torch.Tensor:
    """A float32 value as ggml stores it in fp16 and reads it back (round to nearest even)."""
    return values.to(torch.float16).to(F32)


def divided(numerator: float, values: torch.Tensor) -> torch.Tensor:
    """numerator / values, correctly rounded as C divides: torch computes `number / tensor` as the tensor's
    reciprocal times the number, which rounds twice and differs in the last bit for about a quarter of values."""
    return torch.tensor(numerator, dtype=F32) / values


def as_uint8(codes: torch.Tensor) -> torch.Tensor:
    """An int stored into a uint8_t, wrapping as C does (a negative code becomes 256 + code)."""
    return torch.remainder(codes, 256)


def first_of_largest_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Each column's value of largest magnitude, sign kept; the first of equals, as C's strict > keeps it."""
    return x[x.abs().argmax(dim=0), torch.arange(x.shape[1])]


# ------------------------------------------------------------------ make_qkx2_quants / make_qkx3_quants
def affine_scale(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                 nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scale and a minimum for codes 0..nmax (x ~ scale * code - min, min >= 0) minimising the weighted
    squared error: the scale from max - min, then nstep + 1 candidates (rmin + rdelta * step + nmax) / (max -
    min), each refitted by weighted least squares. Returns (scale, min, codes).

    The candidates are tried one after another because each depends on the last one taken: the C code moves
    `min` to the fitted minimum when a candidate wins, and the next candidates' codes are computed from the
    moved value. Each step works in place on preallocated buffers, which is most of the speed at this size."""
    sum_w, sum_x = sequential_sum(torch.stack([weights, weights * x], dim=1), 0)
    high = x.amax(dim=0)
    minimum = x.amin(dim=0).clamp(max=0)
    flat = high == minimum
    trial = torch.empty_like(x)
    terms = torch.empty(x.shape[0], 3, x.shape[1])  # w * l, w * l * l, w * l * x, summed together
    error_terms = torch.empty_like(x)
    inverse = divided(nmax, high - minimum)
    scale = 1 / inverse
    _affine_codes(x, inverse, minimum, nmax, out=trial)
    best_error = _weighted_error(x, weights, trial, scale, minimum, error_terms)
    # What a winning candidate sets: the inverse scale and the minimum its codes were computed from, its
    # error, scale and minimum.
    state = torch.stack([inverse, minimum, best_error, scale, minimum])
    taken_inverse, taken_shift = inverse, minimum
    steps = torch.arange(nstep + 1, dtype=F32)
    numerators = (torch.tensor(rmin, dtype=F32) + torch.tensor(rdelta, dtype=F32) * steps) + nmax
    for numerator in numerators:
        inverse = numerator / (high - minimum)
        _affine_codes(x, inverse, minimum, nmax, out=trial)
        weighted = torch.mul(weights, trial, out=terms[:, 0])
        torch.mul(weighted, trial, out=terms[:, 1])
        torch.mul(weighted, x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = sequential_sum(terms, 0)
        det = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        trial_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = trial_min > 0
        trial_scale = torch.where(positive, sum_xl / sum_l2, trial_scale)
        trial_min.masked_fill_(positive, 0.0)
        error = _weighted_error(x, weights, trial, trial_scale, trial_min, error_terms)
        better = (det > 0) & (error < best_error)
        # One where for the five per-sub-block values a winning candidate replaces.
        state = torch.where(better, torch.stack([inverse, minimum, error, trial_scale, trial_min]), state)
        taken_inverse, taken_shift, best_error, scale, minimum = state
    codes = _affine_codes(x, taken_inverse, taken_shift, nmax, out=trial)
    return torch.where(flat, 0.0, scale), -minimum, torch.where(flat, 0.0, codes)


def _affine_codes(x: torch.Tensor, inverse: torch.Tensor, minimum: torch.Tensor, nmax: int,
                  out: torch.Tensor) -> torch.Tensor:
    """clamp(nearest_int(inverse * (x - min)), 0, nmax), into `out`."""
    torch.sub(x, minimum, out=out)
    return out.mul_(inverse).round_().clamp_(0, nmax)


def _weighted_error(x, weights, codes, scale, minimum, out: torch.Tensor) -> torch.Tensor:
    """sum of w * (scale * code + min - x)^2 for each sub-block, accumulated in order (`out` is scratch)."""
    torch.mul(codes, scale, out=out)
    out.add_(minimum).sub_(x).square_().mul_(weights)
    return sequential_sum(out, 0)


# ------------------------------------------------------------------------------------- make_qx_quants
def _qx_offsets() -> torch.Tensor:
    """The candidates' offsets from nmax: 0, then 0.1f * is for is = -9..9 without 0, in float32."""
    steps = torch.tensor([0.0] + [step for step in range(-9, 10) if step], dtype=F32)
    return steps * torch.tensor(0.1, dtype=F32)


QX_OFFSETS = _qx_offsets()


def signed_scale(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type 1, weights): a signed scale for codes -nmax..nmax-1, chosen
    among 19 around -nmax / (the value of largest magnitude) by the weighted least-squares fit. Returns
    (scale, codes + nmax); an all-zero sub-block gets scale 0 and codes 0."""
    peak = first_of_largest_magnitude(x)
    tiny = x.abs().amax(dim=0) < TINY
    # (w * x, w), as C's w*x[i]*l and w*l*l group them: one multiply by l gives both terms' start.
    weighted = torch.stack([weights * x, weights], dim=1)
    trial = torch.empty_like(x)
    terms = torch.empty(x.shape[0], 2, x.shape[1])  # w * x * l, w * l * l, summed together
    chosen_inverse = divided(-nmax, peak)
    scale = best = None
    for offset in QX_OFFSETS:
        inverse = -(nmax + offset) / peak
        torch.mul(x, inverse, out=trial).round_().clamp_(-nmax, nmax - 1)
        torch.mul(weighted, trial.unsqueeze(1), out=terms)
        terms[:, 1].mul_(trial)
        sum_lx, sum_l2 = sequential_sum(terms, 0)
        if scale is None:  # the first candidate is taken as it is
            scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, 0.0)
            best = scale * sum_lx
            continue
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        scale = torch.where(better, sum_lx / sum_l2, scale)
        best = torch.where(better, scale * sum_lx, best)
        chosen_inverse = torch.where(better, inverse, chosen_inverse)
    codes = torch.mul(x, chosen_inverse, out=trial).round_().clamp_(-nmax, nmax - 1).add_(nmax)
    return torch.where(tiny, 0.0, scale), torch.where(tiny, 0.0, codes)


# ------------------------------------------------------------------------------------- make_q3_quants
def refined_signed_scale(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse true), Q3_K's search without an importance matrix: codes from
    -nmax / (the value of largest magnitude), then up to five passes that move one code at a time to its
    least-squares best (weights x^2) while that raises the fit. Returns (scale, codes + nmax)."""
    peak = first_of_largest_magnitude(x)
    tiny = x.abs().amax(dim=0) < TINY
    codes = nearest(x * divided(-nmax, peak)).clamp(-nmax, nmax - 1)
    weights = x * x
    weights_x = weights * x
    sum_lx = sequential_sum(weights_x * codes, 0)
    sum_l2 = sequential_sum(weights * codes * codes, 0)
    for _ in range(REFINE_PASSES):
        for i in range(x.shape[0]):
            w, wx, old = weights[i], weights_x[i], codes[i]
            lx = sum_lx - wx * old
            l2 = sum_l2 - w * old * old
            new = nearest(x[i] * l2 / lx).clamp(-nmax, nmax - 1)
            lx_new, l2_new = lx + wx * new, l2 + w * new * new
            take = ((lx > 0) & (new != old) & (l2_new > 0)
                    & (lx_new * lx_new * sum_l2 > sum_lx * sum_lx * l2_new))
            codes[i] = torch.where(take, new, old)
            sum_lx = torch.where(take, lx_new, sum_lx)
            sum_l2 = torch.where(take, l2_new, sum_l2)
    # A pass that changes nothing leaves the state as it was, so running all five equals C's early exit.
    return torch.where(tiny, 0.0, sum_lx / sum_l2), torch.where(tiny, 0.0, codes + nmax)


# ------------------------------------------------------------------------------------- make_qp_quants
def positive_scale(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants(n, nmax, x, L, weights): a scale for codes 0..nmax of non-negative values (a super-block's
    sub-block scales or mins, under an importance matrix): the best of nmax / max and 8 candidates around it,
    then up to five passes moving one code at a time while the weighted fit improves. Returns (scale, codes
    as C stores them in uint8)."""
    high = x.amax(dim=0).clamp(min=0)
    zero = high == 0
    inverse = divided(nmax, high)
    scale = 1 / inverse
    stored = as_uint8(nearest(inverse * x))
    best_error = _weighted_square(weights, x - scale * stored)
    for step in [s for s in range(-4, 5) if s]:
        candidate = (torch.tensor(0.1, dtype=F32) * step + nmax) / high
        codes = nearest(candidate * x).clamp(max=nmax)
        error = _weighted_square(weights, x - (1 / candidate) * codes)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        inverse = torch.where(better, candidate, inverse)
    codes = nearest(inverse * x).clamp(max=nmax)
    weights_x = weights * x
    sum_lx = sequential_sum(weights_x * codes, 0)
    sum_l2 = sequential_sum(weights * codes * codes, 0)
    stored = as_uint8(codes)
    for _ in range(REFINE_PASSES):
        for i in range(x.shape[0]):
            w, wx, old = weights[i], weights_x[i], stored[i]
            lx = sum_lx - wx * old
            l2 = sum_l2 - w * old * old
            new = nearest(x[i] * l2 / lx).clamp(max=nmax)
            lx_new, l2_new = lx + wx * new, l2 + w * new * new
            take = ((lx > 0) & (l2 > 0) & (new != old)
                    & (lx_new * lx_new * sum_l2 > sum_lx * sum_lx * l2_new))
            stored[i] = torch.where(take, as_uint8(new), old)
            sum_lx = torch.where(take, lx_new, sum_lx)
            sum_l2 = torch.where(take, l2_new, sum_l2)
    return torch.where(zero, 0.0, sum_lx / sum_l2), torch.where(zero, 0.0, stored)


def _weighted_square(weights: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """sum of w * diff * diff, in C's order ((w * diff) * diff, accumulated one term after another)."""
    return sequential_sum(weights * diff * diff, 0)
