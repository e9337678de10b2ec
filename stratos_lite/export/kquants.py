"""llama.cpp's K-quant block formats, Q3_K to Q6_K, quantized as llama.cpp's quantizer does, with or without an
importance matrix.

A super-block holds 256 values of one row. Q4_K and Q5_K split it into 8 sub-blocks of 32, each with a
scale and a minimum (x ~ d * sc * q - dmin * m) whose 6-bit codes sc and m are themselves scaled by the
super-block's fp16 d and dmin; q has 4 or 5 bits. Q6_K and Q3_K split it into 16 sub-blocks of 16 with a
signed scale each (8 bits in Q6_K, 6 in Q3_K) under one fp16 d, and q has 6 or 3 bits (x ~ d * sc * q).

Without an importance matrix each type follows its `quantize_row_*_ref` in ggml-quants.c, which is what
`llama-quantize` does when none is given. With one (a weight per input channel: the mean squared activation
the matrix recorded) it follows `quantize_row_*_impl`: each value's error is weighted by its channel's
importance, and for Q3_K to Q5_K the super-block's scales are chosen by a weighted search too. The searches
live in kquant_search.py; this module lays out sub-blocks, derives the weights and packs the bytes.
tests/test_kquants.py compares every block with llama.cpp's quantizer, with and without a matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from .kquant_search import (
    F32,
    TINY,
    affine_scale,
    exact_sqrt,
    first_of_largest_magnitude,
    fp16,
    nearest,
    positive_scale,
    refined_signed_scale,
    sequential_sum,
    signed_scale,
)

SUPER_BLOCK = 256  # values per super-block (QK_K)
BLOCK_BYTES = {"q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}
CHUNK_VALUES = 1 << 19  # values quantized at a time: a chunk's working buffers stay in cache


def quantize_k(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """A 2-D weight (rows, columns a multiple of 256) as `kind` blocks: bytes (rows, columns / 256 * size).
    `importance`: one non-negative weight per column (an importance matrix's entry for this tensor), or None."""
    rows, columns = weight.shape
    if columns % SUPER_BLOCK:
        raise ValueError(f"{kind} needs rows of a multiple of {SUPER_BLOCK} values, got {columns}")
    if importance is not None and importance.shape != (columns,):
        raise ValueError(f"the importance of a {kind} weight must hold one value per column ({columns}), "
                         f"got shape {tuple(importance.shape)}")
    out = np.empty((rows, columns // SUPER_BLOCK * BLOCK_BYTES[kind]), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // columns)  # a chunk's working buffers stay in cache, and memory stays bounded
    quantize = {"q3_k": _q3_k, "q4_k": _q45_k, "q5_k": _q45_k, "q6_k": _q6_k}[kind]
    importance = None if importance is None else importance.to("cpu", F32)
    for start in range(0, rows, step):
        chunk = weight[start:start + step].detach().to("cpu", F32)
        row_weights = None if importance is None else importance.expand(len(chunk), -1)
        blocks = quantize(chunk.reshape(-1, SUPER_BLOCK), kind,
                          None if row_weights is None else row_weights.reshape(-1, SUPER_BLOCK))
        out[start:start + step] = blocks.numpy().reshape(-1, out.shape[1])
    return out


def _columns(values: torch.Tensor, size: int) -> torch.Tensor:
    """Super-blocks (n, 256) as sub-blocks of `size` values, one per column: (size, n * 256 / size)."""
    return values.reshape(-1, size).T.contiguous()


# ---------------------------------------------------------------------------------------------- Q4_K, Q5_K
# make_qkx2_quants' settings without an importance matrix: (largest code, rmin, rdelta, nstep) per type;
# with one, make_qkx3_quants with the same rmin, rdelta and nstep for both.
_QKX2 = {"q4_k": (15, -1.0, 0.1, 20), "q5_k": (31, -0.5, 0.1, 15)}
_QKX3 = (-0.9, 0.05, 36)


def _q45_k(x: torch.Tensor, kind: str, importance: torch.Tensor | None) -> torch.Tensor:
    """Q4_K or Q5_K blocks of x (super-blocks, 256): d, dmin, 12 bytes of 6-bit scales and mins, the codes."""
    nmax = _QKX2[kind][0]
    n = x.shape[0]
    sub = _columns(x, 32)  # (32, sub-blocks): column sums run over contiguous rows
    if importance is None:
        weights = exact_sqrt(sequential_sum(sub * sub, 0) / 32.0) + sub.abs()
        scales, mins, search_codes = affine_scale(sub, weights, *_QKX2[kind])
        d, scale_codes = _six_bit_codes(scales.reshape(n, 8))
        dmin, min_codes = _six_bit_codes(mins.reshape(n, 8))
    else:
        weights = _weighted_by_importance(x, importance, 32)
        scales, mins, search_codes = affine_scale(sub, weights, nmax, *_QKX3)
        block_weights = sequential_sum(weights, 0).reshape(n, 8).T
        d, scale_codes = positive_scale(scales.reshape(n, 8).T, block_weights, 63)
        dmin, min_codes = positive_scale(mins.reshape(n, 8).T, block_weights, 63)
        d, dmin = fp16(d), fp16(dmin)
        scale_codes, min_codes = scale_codes.T.to(torch.uint8), min_codes.T.to(torch.uint8)
        if kind == "q5_k":
            scale_codes, min_codes = scale_codes.clamp(max=63), min_codes.clamp(max=63)
    # The codes read back from the packed bytes are the low six bits of what was stored.
    step = d[:, None] * (scale_codes & 63).to(F32)  # (n, 8): each sub-block's d * sc and dmin * m
    offset = dmin[:, None] * (min_codes & 63).to(F32)
    codes = nearest((x.reshape(n, 8, 32) + offset[..., None]) / step[..., None]).clamp(0, nmax)
    # Where d * sc is 0 the C code keeps the search's codes.
    search_codes = search_codes.T.reshape(n, 8, 32)
    codes = torch.where((step == 0)[..., None], search_codes, codes).to(torch.uint8).reshape(n, 256)
    header = torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales(scale_codes, min_codes)], dim=1)
    if kind == "q4_k":
        return torch.cat([header, _pack_nibbles(codes)], dim=1)
    return torch.cat([header, _pack_fifth_bits(codes), _pack_nibbles(codes & 15)], dim=1)


def _weighted_by_importance(x: torch.Tensor, importance: torch.Tensor, size: int) -> torch.Tensor:
    """quantize_row_*_impl's weights for sub-blocks of `size` (as columns): importance * sqrt(sigma2 + x^2),
    sigma2 being twice the super-block's mean square (its sum accumulated in order over the 256 values)."""
    sigma2 = 2 * sequential_sum(x.T * x.T, 0) / SUPER_BLOCK
    per_value = sigma2[:, None] + x * x
    return _columns(importance, size) * exact_sqrt(_columns(per_value, size))


def _six_bit_codes(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A super-block's 8 scales (or mins) as an fp16 unit, largest / 63, and 6-bit codes in that unit."""
    # C starts the maximum at +0 and keeps a value only if greater: a -0 minimum must not become it.
    largest = torch.where(values > 0, values, 0.0).amax(dim=1)
    inverse = torch.where(largest > 0, torch.tensor(63.0) / largest, torch.zeros(()))
    return fp16(largest / 63.0), _six_bits(inverse[:, None] * values)


def _six_bits(values: torch.Tensor) -> torch.Tensor:
    """`uint8_t l = nearest_int(v); l = MIN(63, l)`."""
    return torch.bitwise_and(nearest(values).to(torch.int32), 255).clamp(max=63).to(torch.uint8)


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
def _q6_k(x: torch.Tensor, kind: str, importance: torch.Tensor | None) -> torch.Tensor:
    """Q6_K blocks of x (super-blocks, 256): low nibbles, high bit pairs, 16 signed scales, fp16 d."""
    n = x.shape[0]
    sub = _columns(x, 16)  # (16, sub-blocks)
    # Without a matrix a value weighs x^2; with one, its channel's importance alone (quantize_row_q6_K_impl).
    scales, search_codes = signed_scale(sub, sub * sub if importance is None else _columns(importance, 16), 32)
    scales = scales.reshape(n, 16)
    max_scale = first_of_largest_magnitude(scales.T)
    zero = scales.abs().amax(dim=1) < TINY
    inverse = torch.tensor(-128.0) / max_scale
    d = fp16(1 / inverse)
    scale_codes = nearest(inverse[:, None] * scales).clamp(max=127)
    step = d[:, None] * scale_codes
    values = x.reshape(n, 16, 16)
    codes = nearest(values / step[..., None]).clamp(-32, 31) + 32
    codes = torch.where((step == 0)[..., None], search_codes.T.reshape(n, 16, 16), codes).to(torch.uint8)
    codes = codes.reshape(n, 256)
    blocks = torch.cat([_pack_q6_low(codes), _pack_q6_high(codes), scale_codes.to(torch.int8).view(torch.uint8),
                        _fp16_bytes(d)], dim=1)
    return torch.where(zero[:, None], torch.zeros((), dtype=torch.uint8), blocks)


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


# ---------------------------------------------------------------------------------------------------- Q3_K
def _q3_k(x: torch.Tensor, kind: str, importance: torch.Tensor | None) -> torch.Tensor:
    """Q3_K blocks of x (super-blocks, 256): high-bit mask, low bit pairs, 16 six-bit scales, fp16 d."""
    n = x.shape[0]
    sub = _columns(x, 16)
    if importance is None:  # quantize_row_q3_K_ref
        scales, search_codes = refined_signed_scale(sub, 4)
        scales = scales.reshape(n, 16)
        max_scale = first_of_largest_magnitude(scales.T)
        inverse = torch.tensor(-32.0) / max_scale
        scale_codes = nearest(inverse[:, None] * scales).clamp(-32, 31) + 32
        d = fp16(torch.where(max_scale != 0, 1 / inverse, 0.0))
        scale_codes = torch.where((max_scale != 0)[:, None], scale_codes, 0.0)
    else:  # quantize_row_q3_K_impl: the scales, weighted by their sub-blocks' total weight, searched as values
        weights = _weighted_by_importance(x, importance, 16)
        scales, search_codes = signed_scale(sub, weights, 4)
        d, scale_codes = signed_scale(scales.reshape(n, 16).T, sequential_sum(weights, 0).reshape(n, 16).T, 32)
        d, scale_codes = fp16(d), scale_codes.T
    step = d[:, None] * (scale_codes - 32)  # the packed six bits hold code + 32
    codes = nearest(x.reshape(n, 16, 16) / step[..., None]).clamp(-4, 3) + 4
    codes = torch.where((step == 0)[..., None], search_codes.T.reshape(n, 16, 16), codes).to(torch.uint8)
    codes = codes.reshape(n, 256)
    return torch.cat([_pack_q3_high_bits(codes), _pack_q3_low(codes & 3), _pack_q3_scales(scale_codes.to(torch.uint8)),
                      _fp16_bytes(d)], dim=1)


def _pack_q3_high_bits(codes: torch.Tensor) -> torch.Tensor:
    """hmask: bit c of byte l is set when value 32c + l's code is above 3."""
    high = (codes > 3).reshape(-1, 8, 32).to(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32)[None, :, None]
    return (high << shifts).sum(dim=1).to(torch.uint8)


def _pack_q3_low(low: torch.Tensor) -> torch.Tensor:
    """The low two bits: per 128 values, byte l holds values l, 32 + l, 64 + l, 96 + l (low to high)."""
    quarters = low.reshape(-1, 2, 4, 32).to(torch.int32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32)[None, None, :, None]
    return (quarters << shifts).sum(dim=2).to(torch.uint8).reshape(-1, 64)


def _pack_q3_scales(codes: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit scales in 12 bytes: low nibbles of scales j and j + 8 in byte j (j < 8); the top two bits
    of scale 4g + m at bits 2g of byte 8 + m."""
    low = codes & 15
    nibbles = low[:, :8] | (low[:, 8:] << 4)
    high = (codes >> 4).to(torch.int32).reshape(-1, 4, 4)  # [g, m] = scale 4g + m
    shifts = (2 * torch.arange(4, dtype=torch.int32))[None, :, None]
    return torch.cat([nibbles, (high << shifts).sum(dim=1).to(torch.uint8)], dim=1)
