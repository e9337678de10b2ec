"""How a packed row's attention is best kept inside each example, on this machine: one SDPA call per example
(model.Segments, what the library does) against one call over the whole row with a block-diagonal causal mask
(what a dense attn_mask or flex_attention's document mask computes without a fused kernel), forward and
backward, at Qwen3-0.6B's attention shape (16 query heads, 8 key/value heads, head_dim 128).

    python benchmarks/packed_attention.py [--row 2048] [--repeats 5]

The row holds examples drawn from benchmarks/packing_speed.py's length distribution until it is full.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from timing import median_seconds

from stratos_lite.model.attention import Segments, attend

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
MEDIAN_TOKENS, SIGMA, SHORTEST, LONGEST = 330, 0.45, 120, 1024


def row_lengths(row: int, seed: int = 0) -> list[int]:
    """Example lengths from packing_speed.py's log-normal, taken until the next would overflow the row."""
    generator, lengths = torch.Generator().manual_seed(seed), []
    while True:
        length = int(torch.randn(1, generator=generator, dtype=torch.float64).mul(SIGMA)
                     .add(math.log(MEDIAN_TOKENS)).exp().clamp(SHORTEST, LONGEST))
        if sum(lengths) + length > row:
            return lengths
        lengths.append(length)


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    example = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    same = example[:, None] == example[None, :]
    return same & torch.ones(len(example), len(example), dtype=torch.bool).tril()


def fwd_bwd(run, q, k, v):
    def step():
        for t in (q, k, v):
            t.grad = None
        run(q, k, v).float().sum().backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lengths = row_lengths(args.row)
    tokens = sum(lengths)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; row of {tokens} tokens: examples {lengths}")
    segments, mask = Segments(tuple(lengths)), block_causal_mask(lengths)[None, None]
    print(f"{'dtype':<10}{'per example (Segments)':>24}{'one call, block mask':>22}{'ratio':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, KV_HEADS, tokens, HEAD_DIM, dtype=dtype, requires_grad=True) for _ in range(2))
        ours = median_seconds(fwd_bwd(lambda q, k, v: attend(q, k, v, segments, gqa=True), q, k, v), args.repeats)
        masked = median_seconds(fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True), q, k, v), args.repeats)
        print(f"{str(dtype).removeprefix('torch.'):<10}{ours * 1e3:>21.1f} ms{masked * 1e3:>19.1f} ms"
              f"{masked / ours:>8.2f}")


if __name__ == "__main__":
    main()
