"""llama.cpp's K-quant block formats, Q4_K, Q5_K and Q6_K, quantized as llama.cpp's reference quantizer does.

A super-block holds 256 values of one row. Q4_K and Q5_K split it into 8 sub-blocks of 32, each with a
scale and a minimum (x ~ d * sc * q - dmin * m) whose 6-bit codes sc and m are themselves scaled by the
super-block's fp16 d and dmin; q has 4 or 5 bits. Q6_K splits it into 16 sub-blocks of 16 with a signed
8-bit scale each under one fp16 d, and q has 6 bits (x ~ d * sc * (q - 32)).

The search for each sub-block's scale follows ggml-quants.c (`make_qkx2_quants` for Q4_K/Q5_K,
`make_qx_quants` for Q6_K) without an importance matrix, which is what `llama-quantize` uses when none is
given. It is written here in float32 tensor operations, vectorised over every sub-block of a chunk of rows,
in the C code's order of operations: each sum accumulates its terms one after another (not pairwise), the
square root is correctly rounded, and the candidate scales are tried one after another, the first strictly
better one winning, so that the rounding, hence the chosen scales and the bytes, are llama.cpp's
(tests/test_kquants.py compares every block with llama_model_quantize's).
"""

from __future__ import annotations

import numpy as np
import torch

SUPER_BLOCK = 256  # values per super-block (QK_K)
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
TINY = 1e-15  # GROUP_MAX_EPS: a sub-block whose largest magnitude is below this is all zeros
CHUNK_VALUES = 1 << 19  # values quantized at a time: a chunk's working buffers stay in cache
_F32 = torch.float32


def quantize_k(weight: torch.Tensor, kind: str) -> np.ndarray:
    """A 2-D weight (rows, columns a multiple of 256) as `kind` blocks: bytes (rows, columns / 256 * size)."""
    rows, columns = weight.shape
    if columns % SUPER_BLOCK:
        raise ValueError(f"{kind} needs rows of a multiple of {SUPER_BLOCK} values, got {columns}")
    out = np.empty((rows, columns // SUPER_BLOCK * BLOCK_BYTES[kind]), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // columns)  # a chunk's working buffers stay in cache, and memory stays bounded
    for start in range(0, rows, step):
        x = weight[start:start + step].detach().to("cpu", _F32).reshape(-1, SUPER_BLOCK)
        blocks = _q6_k(x) if kind == "q6_k" else _q45_k(x, kind)
        out[start:start + step] = blocks.numpy().reshape(-1, out.shape[1])
    return out


def _sequential_sum(terms: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum along `dim` one term after another, as a C loop accumulates: float addition is not associative,
    and llama.cpp's choices between candidate scales depend on the last bit of these sums."""
    first, second, *rest = terms.unbind(dim)
    total = torch.add(first, second)
    for term in rest:
        total += term
    return total


def _nearest(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even, as float32 (the values are small integers)."""
    return torch.round(values)


def _sqrt(values: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's vectorised float32 sqrt may be off by an ulp, which moves llama.cpp's
    weights; the float64 root rounded to float32 is exact."""
    return torch.sqrt(values.double()).float()


def _fp16(values: torch.Tensor) -> torch.Tensor:
    """A float32 value as the fp16 ggml stores and reads back (round to nearest even)."""
    return values.to(torch.float16).to(_F32)


# ---------------------------------------------------------------------------------------------- Q4_K, Q5_K
# make_qkx2_quants' settings: (largest code, rmin, rdelta, nstep) per type.
_QKX2 = {"q4_k": (15, -1.0, 0.1, 20), "q5_k": (31, -0.5, 0.1, 15)}


def _q45_k(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Q4_K or Q5_K blocks of x (super-blocks, 256): d, dmin, 12 bytes of 6-bit scales and mins, the codes."""
    nmax = _QKX2[kind][0]
    n = x.shape[0]
    sub = x.reshape(n * 8, 32).T.contiguous()  # (32, sub-blocks): column sums run over contiguous rows
    scales, mins, search_codes = _scale_and_min(sub, kind)
    d, scale_codes = _six_bit_codes(scales.reshape(n, 8))
    dmin, min_codes = _six_bit_codes(mins.reshape(n, 8))
    step = d[:, None] * scale_codes.to(_F32)  # (n, 8): each sub-block's d * sc and dmin * m
    offset = dmin[:, None] * min_codes.to(_F32)
    codes = _nearest((x.reshape(n, 8, 32) + offset[..., None]) / step[..., None]).clamp(0, nmax)
    # Where d * sc is 0 the C code keeps the search's codes.
    search_codes = search_codes.T.reshape(n, 8, 32)
    codes = torch.where((step == 0)[..., None], search_codes, codes).to(torch.uint8).reshape(n, 256)
    header = torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales(scale_codes, min_codes)], dim=1)
    if kind == "q4_k":
        return torch.cat([header, _pack_nibbles(codes)], dim=1)
    return torch.cat([header, _pack_fifth_bits(codes), _pack_nibbles(codes & 15)], dim=1)


def _six_bit_codes(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A super-block's 8 scales (or mins) as an fp16 unit, largest / 63, and 6-bit codes in that unit."""
    # C starts the maximum at +0 and keeps a value only if greater: a -0 minimum must not become it.
    largest = torch.where(values > 0, values, 0.0).amax(dim=1)
    inverse = torch.where(largest > 0, torch.tensor(63.0) / largest, torch.zeros(()))
    return _fp16(largest / 63.0), _six_bits(inverse[:, None] * values)


def _scale_and_min(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants for every sub-block (the columns of x, 32 values each), with llama.cpp's weights
    (the sub-block's RMS + |x|): the scale, the minimum to subtract (>= 0) and the codes the search ended on.

    The candidates are tried one after another because each depends on the last one taken: the C code
    moves `min` to the fitted minimum when a candidate wins, and the next candidates' scales and codes are
    computed from the moved value. Each step works in place on preallocated buffers, which is most of the
    speed at this size."""
    nmax, rmin, rdelta, nstep = _QKX2[kind]
    weights = _sqrt(_sequential_sum(x * x, 0) / 32.0) + x.abs()
    sum_w, sum_x = _sequential_sum(torch.stack([weights, weights * x], dim=1), 0)
    high = x.amax(dim=0)
    minimum = x.amin(dim=0).clamp(max=0)
    flat = high == minimum
    # The trial codes beside x, so that one multiply by w * l gives both w * l * l and w * l * x.
    codes_and_x = torch.stack([torch.empty_like(x), x], dim=1)
    trial = codes_and_x[:, 0]
    terms = torch.empty(x.shape[0], 3, x.shape[1])  # w * l, w * l * l, w * l * x, summed together
    error_terms = torch.empty_like(x)
    inverse = float(nmax) / (high - minimum)
    scale = 1 / inverse
    _codes(x, inverse, minimum, nmax, out=trial)
    best_error = _weighted_error(x, weights, trial, scale, minimum, error_terms)
    # What a winning candidate sets: the inverse scale and the minimum its codes were computed from, its
    # error, scale and minimum.
    state = torch.stack([inverse, minimum, best_error, scale, minimum])
    # (rmin + rdelta * is + nmax) for is = 0..nstep, each step rounded to float32 as C rounds it.
    steps = torch.arange(nstep + 1, dtype=_F32)
    numerators = (torch.tensor(rmin, dtype=_F32) + torch.tensor(rdelta, dtype=_F32) * steps) + nmax
    for numerator in numerators:
        inverse = numerator / (high - minimum)
        _codes(x, inverse, minimum, nmax, out=trial)
        weighted = torch.mul(weights, trial, out=terms[:, 0])
        torch.mul(weighted.unsqueeze(1), codes_and_x, out=terms[:, 1:])
        sum_l, sum_l2, sum_xl = _sequential_sum(terms, 0)
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
    codes = _codes(x, taken_inverse, taken_shift, nmax, out=trial)
    return torch.where(flat, 0.0, scale), -minimum, torch.where(flat, 0.0, codes)


def _codes(x: torch.Tensor, inverse: torch.Tensor, minimum: torch.Tensor, nmax: int, out: torch.Tensor) -> torch.Tensor:
    """clamp(nearest_int(inverse * (x - min)), 0, nmax), into `out`."""
    torch.sub(x, minimum, out=out)
    return out.mul_(inverse).round_().clamp_(0, nmax)


def _weighted_error(x, weights, codes, scale, minimum, out: torch.Tensor) -> torch.Tensor:
    """sum of w * (scale * code + min - x)^2 for each sub-block, accumulated in order (`out` is scratch)."""
    torch.mul(codes, scale, out=out)
    out.add_(minimum).sub_(x).square_().mul_(weights)
    return _sequential_sum(out, 0)


def _six_bits(values: torch.Tensor) -> torch.Tensor:
    """`uint8_t l = nearest_int(v); l = MIN(63, l)`."""
    return torch.bitwise_and(_nearest(values).to(torch.int32), 255).clamp(max=63).to(torch.uint8)


def _pack_scales(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins in 12 bytes: the first four of each whole, the last four as low nibbles
    in bytes 8-11 with their top two bits in the top of bytes 0-7."""
    low_s, high_s = scales[:, :4], scales[:, 4:]
    low_m, high_m = mins[:, :4], mins[:, 4:]
    return torch.cat([low_s | ((high_s >> 4) << 6), low_m | ((high_m >> 4) << 6), (high_s & 15) | ((high_m & 15) << 4)],
                     dim=1)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0-15 of each 64 values: value l in the low nibble of byte l, value 32 + l in its high nibble."""
    pairs = codes.reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _pack_fifth_bits(codes: torch.Tensor) -> torch.Tensor:
    """Q5_K's high bits: bit 2c of byte l is value 64c + l's, bit 2c + 1 is value 64c + 32 + l's."""
    high = (codes >> 4).reshape(-1, 8, 32).to(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32)[None, :, None]
    return (high << shifts).sum(dim=1).to(torch.uint8)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).view(torch.uint8).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------- Q6_K
# make_qx_quants' candidates: -(nmax + 0.1f * is) / max for is = 0, then -9..9 without 0, 0.1f * is in float32.
_QX_OFFSETS = torch.tensor([0.0] + [step for step in range(-9, 10) if step], dtype=_F32) * torch.tensor(0.1, dtype=_F32)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks of x (super-blocks, 256): low nibbles, high bit pairs, 16 signed scales, fp16 d."""
    n = x.shape[0]
    sub = x.reshape(n * 16, 16).T.contiguous()  # (16, sub-blocks)
    scales, search_codes = _signed_scale(sub)
    scales = scales.reshape(n, 16)
    largest = scales.abs().argmax(dim=1)  # the first of equal magnitudes, as C's strict > keeps
    max_scale = scales[torch.arange(n), largest]
    zero = scales.abs().amax(dim=1) < TINY
    inverse = torch.tensor(-128.0) / max_scale
    d = _fp16(1 / inverse)
    scale_codes = _nearest(inverse[:, None] * scales).clamp(max=127)
    step = d[:, None] * scale_codes
    values = x.reshape(n, 16, 16)
    codes = _nearest(values / step[..., None]).clamp(-32, 31) + 32
    codes = torch.where((step == 0)[..., None], search_codes.T.reshape(n, 16, 16), codes).to(torch.uint8)
    codes = codes.reshape(n, 256)
    blocks = torch.cat([_pack_q6_low(codes), _pack_q6_high(codes), scale_codes.to(torch.int8).view(torch.uint8),
                        _fp16_bytes(d)], dim=1)
    return torch.where(zero[:, None], torch.zeros((), dtype=torch.uint8), blocks)


def _signed_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(16, 32, x, L, rmse_type 1) for every sub-block (the columns of x): a signed scale chosen
    among 19 around -32 / (the value of largest magnitude), by the x^2-weighted fit, and its codes (+32)."""
    nmax = 32.0
    columns = torch.arange(x.shape[1])
    peak = x[x.abs().argmax(dim=0), columns]  # the first value of largest magnitude, sign kept
    tiny = x.abs().amax(dim=0) < TINY
    weight = x * x
    # (w * x, w) with w = x^2, as C's w*x[i]*l and w*l*l group them: one multiply by l gives both terms' start.
    weights = torch.stack([weight * x, weight], dim=1)
    trial = torch.empty_like(x)
    terms = torch.empty(x.shape[0], 2, x.shape[1])  # w * x * l, w * l * l, summed together
    chosen_inverse = -nmax / peak
    scale = best = None
    for offset in _QX_OFFSETS:
        inverse = -(nmax + offset) / peak
        torch.mul(x, inverse, out=trial).round_().clamp_(-nmax, nmax - 1)
        torch.mul(weights, trial.unsqueeze(1), out=terms)
        terms[:, 1].mul_(trial)
        sum_lx, sum_l2 = _sequential_sum(terms, 0)
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


def _pack_q6_low(codes: torch.Tensor) -> torch.Tensor:
    """Low nibbles: per 128 values, byte l holds values l and 64 + l, byte 32 + l values 32 + l and 96 + l."""
    quarters = (codes & 15).reshape(-1, 2, 4, 32)
    return torch.cat([quarters[:, :, 0] | (quarters[:, :, 2] << 4), quarters[:, :, 1] | (quarters[:, :, 3] << 4)],
                     dim=2).reshape(-1, 128)


def _pack_q6_high(codes: torch.Tensor) -> torch.Tensor:
    """Top two bits: per 128 values, byte l holds those of values l, 32 + l, 64 + l, 96 + l (low to high)."""
    quarters = (codes >> 4).reshape(-1, 2, 4, 32).to(torch.int32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32)[None, None, :, None]
    return (quarters << shifts).sum(dim=2).to(torch.uint8).reshape(-1, 64)
