"""Scaled dot-product attention as the model calls it: causal over a call's tokens, under a boolean mask, per
example of a packed row, or one new token over a cache, each routed so that no kernel is ruled out for want of
a mask or GQA support and no key or value is repeated."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segments:
    """A packed row (batch 1) of whole examples of these lengths: each attends causally to itself only.

    Passed where an attention mask goes. Attention runs once per example on its own slice of q, k and v, so a
    row costs the sum of its examples' T^2 rather than the row's T^2 and needs no mask, which keeps the fast
    kernels (flash on GPUs and CPUs, which refuse arbitrary masks) in play."""
    lengths: tuple[int, ...]

    def bounds(self) -> list[tuple[int, int]]:
        ends = list(itertools.accumulate(self.lengths))
        return list(zip([0, *ends[:-1]], ends, strict=True))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, gqa: bool) -> torch.Tensor:
    """SDPA under `mask`: None for causal attention over the call's tokens (for one new token after a
    cache: every key), a boolean mask, or Segments."""
    if isinstance(mask, Segments):
        return attend_segments(q, k, v, mask, gqa)
    if q.shape[2] == 1:
        return attend_one_token(q, k, v, mask)
    if mask is not None and gqa:
        return attend_folded(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def attend_folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A masked call over grouped keys (a padded prefill): the query heads that share a key/value head are
    folded into that head's query rows, (b, kv_heads, group x t, head_dim), and the mask's rows repeated for
    them. No kernel then needs GQA support (ROCm's memory-efficient one has none, and would fall to the math
    kernel with K and V repeated), and no key or value is copied."""
    b, heads, t, dim = q.shape
    group = heads // k.shape[1]
    folded = q.reshape(b, k.shape[1], group * t, dim)
    rows = mask.repeat(*[1] * (mask.dim() - 2), group, 1)
    return F.scaled_dot_product_attention(folded, k, v, attn_mask=rows).reshape(b, heads, t, dim)


@torch.compiler.disable  # each packed row has its own lengths: a compiled layer would compile for every row
def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, gqa: bool) -> torch.Tensor:
    return torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                     enable_gqa=gqa) for s, e in segments.bounds()], dim=2)


def attend_one_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A decoding step's attention: one query per head over every cached key, without repeating the cache.

    The query heads that share a key/value head are folded into that head's query rows, (b, kv_heads,
    group, head_dim): the same products as repeating K and V group times, which SDPA's math kernel (and
    enable_gqa where a kernel lacks it) would copy at every token. A (b, 1, 1, keys) padding mask applies to
    every row alike; without one no mask is passed at all, so no kernel is ruled out for it."""
    b, heads, _, dim = q.shape
    folded = q.view(b, k.shape[1], heads // k.shape[1], dim)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
    return out.view(b, heads, 1, dim)
