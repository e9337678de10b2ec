"""What the loss over the vocabulary in chunks, and activations offloaded to the host, cost per step.

    python benchmarks/loss_speed.py                                  # Qwen3-0.6B's shape, bf16, on this machine
    python benchmarks/loss_speed.py --chunks 0 256 1024 --accum 2 --steps 4 --rounds 2

Two measurements, side by side in one run:

1. The loss alone: token_cross_entropy forward and backward at one micro-batch's completion positions (batch x
   a fifth of --seq), the output weight frozen, at each TrainConfig.loss_chunk, interleaved and repeated: the
   part of a step the chunking changes, timed without the rest of the step's noise around it.
2. Whole steps: a V2 step (batch 2 x --accum micro-batches of --seq tokens, the last fifth of each the
   completion, DoRA r16, whole-layer checkpointing) at each loss_chunk, then the default chunk with
   offload_activations = true, each row in a child of its own (step_speed.py's). The rows run --rounds times in
   turn, so a drift of the machine's speed falls on all of them; each ratio is to loss_chunk = 0 in the same
   round, and the table shows the median over rounds with the memory (peak RSS growth on a CPU; peak allocated
   on a GPU) beside the plan's live peak.
"""

from __future__ import annotations

import argparse
import statistics
import time

import step_speed
import torch
from step_speed import device, device_name, interleaved_rows, synchronize

import stratos_lite as sl
from stratos_lite.model.vocab_loss import token_cross_entropy


def loss_alone_seconds(shape: dict, positions: int, chunk: int, dtype: torch.dtype) -> float:
    """One forward and backward of the loss at `positions` completion positions, the output weight frozen."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, shape["hidden_size"], generator=generator).to(device(), dtype).requires_grad_()
    weight = (torch.randn(shape["vocab_size"], shape["hidden_size"], generator=generator) * 0.02).to(device(), dtype)
    targets = torch.randint(0, shape["vocab_size"], (positions,), generator=generator).to(device())
    synchronize()
    start = time.perf_counter()
    token_cross_entropy(hidden, weight, targets, chunk).mean().backward()
    synchronize()
    return time.perf_counter() - start


def loss_alone(shape: dict, positions: int, chunks: list[int], dtype: torch.dtype, repeats: int) -> None:
    print(f"the loss alone: {positions} positions x vocabulary {shape['vocab_size']:,}, hidden "
          f"{shape['hidden_size']}, {dtype}; median of {repeats}, interleaved")
    times: dict[int, list[float]] = {chunk: [] for chunk in chunks}
    for _ in range(repeats + 1):  # the first round warms up
        for chunk in chunks:
            times[chunk].append(loss_alone_seconds(shape, positions, chunk, dtype))
    anchor = statistics.median(times[chunks[0]][1:])
    for chunk in chunks:
        seconds = statistics.median(times[chunk][1:])
        print(f"  loss_chunk {chunk:<6}{seconds:>8.3f} s{seconds / anchor:>8.3f}", flush=True)


def step_rows(args, default_chunk: int) -> list[tuple[str, dict]]:
    rows = [(f"loss_chunk {chunk}", {"loss_chunk": chunk}) for chunk in args.chunks]
    rows.append((f"loss_chunk {default_chunk}, offloaded", {"loss_chunk": default_chunk,
                                                            "offload_activations": True}))
    return rows


def whole_steps(args, rows: list[tuple[str, dict]]) -> None:
    print(f"whole steps: shape {args.shape}; seq {args.seq}; batch {step_speed.BATCH} x accumulation {args.accum}; "
          f"{args.dtype}; DoRA r16; whole-layer checkpointing; {args.rounds} round(s) of the rows in turn")
    interleaved_rows([(label, {"checkpoint_policy": "layer", **settings}) for label, settings in rows], args.shape,
                     args.seq, args.dtype, args.steps, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(step_speed.SHAPES), default="qwen3-0.6b")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loss-repeats", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 128, 256, 512, 1024])
    args = parser.parse_args()
    step_speed.ACCUM = args.accum
    print(f"device: {device_name()}")
    shape = step_speed.SHAPES[args.shape]
    loss_alone(shape, step_speed.BATCH * (args.seq // 5), args.chunks, getattr(torch, args.dtype), args.loss_repeats)
    whole_steps(args, step_rows(args, sl.TrainConfig().loss_chunk))


if __name__ == "__main__":
    main()
