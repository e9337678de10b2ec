"""What a 4-bit base (base_quant = "nf4") costs per step against the bf16 base, and LoRA against DoRA.

    python benchmarks/base_quant_speed.py                           # Qwen3-0.6B's shape, bf16, on this machine
    python benchmarks/base_quant_speed.py --modes dora lora         # QDoRA, LoRA and QLoRA against DoRA
    python benchmarks/base_quant_speed.py --shape qwen3-8b --seq 1024 --rounds 1     # on a GPU

A V2 step (batch 2 x --accum micro-batches of --seq tokens, the last fifth of each the completion, the adapter r16
on all seven linears, gradient checkpointing with --policy), for each of --modes on the base in the compute dtype
and on the same base quantized to NF4, each row in a child of its own (step_speed.py's), the rows run --rounds
times in turn: the median step, the median ratio to the first row (DoRA on the full base) of the same round,
and the memory beside the plan's live peak.
"""

from __future__ import annotations

import argparse

import step_speed
from step_speed import device_name, interleaved_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(step_speed.SHAPES), default="qwen3-0.6b")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--policy", default="layer", choices=["layer", "mlp"], help="gradient checkpointing's")
    parser.add_argument("--modes", nargs="+", default=["dora"], choices=["dora", "lora"])
    args = parser.parse_args()
    step_speed.ACCUM = args.accum
    print(f"device: {device_name()}; shape {args.shape}; seq {args.seq}; batch {step_speed.BATCH} x accumulation "
          f"{args.accum}; {args.dtype}; r16; {args.rounds} round(s) of the rows in turn")
    rows = [(f"{mode}, {base} base, {args.policy}", {"mode": mode, "checkpoint_policy": args.policy,
                                                     "base_quant": "nf4" if base == "nf4" else "none"})
            for mode in args.modes for base in (args.dtype, "nf4")]
    interleaved_rows(rows, args.shape, args.seq, args.dtype, args.steps, args.rounds)


if __name__ == "__main__":
    main()
