"""How long the plan takes: the fit check the train command runs (the run's own micro-batch simulated), and the
alternatives the printed plan adds (largest batch, longest row, activations without checkpointing).

    python benchmarks/plan_speed.py --shape qwen3-8b                  # the V2 settings at Qwen3-8B's shape
    python benchmarks/plan_speed.py --shape tiny6 --allocator-from a9e41a3~1

Nothing is loaded: sl.plan on fake tensors, on the CPU, with memory 24GiB. --allocator-from REV also plans with
planning/allocator.py as it was at REV (read with git show), in the same run, and prints the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

from step_speed import SHAPES

import stratos_lite as sl
from stratos_lite.planning import simulator
from stratos_lite.planning.report import DataShape

ROOT = Path(__file__).resolve().parents[1]
PLANNED = {**SHAPES, "tiny6": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)}  # the several-ranks plan test's shape


def timed_plan(shape: str) -> tuple[float, float, int]:
    """(seconds of sl.plan, seconds of the alternatives when the text is made, micro-batches simulated)."""
    simulated = []
    micro_batch = simulator.Simulator.micro_batch

    def counted(self, *args, **kwargs):
        simulated.append(args[:2])
        return micro_batch(self, *args, **kwargs)

    simulator.Simulator.micro_batch = counted
    try:
        config = sl.TrainConfig(batch_size=2, grad_accum=8, dtype="bfloat16", max_len=1024)
        data = DataShape(examples=1000, longest=1024, longest_completion=256, mean_tokens=1024, source="synthetic")
        start = time.perf_counter()
        the_plan = sl.plan(config, model_config=sl.Qwen3Config(**PLANNED[shape]), data=data, memory="24GiB",
                           device="cpu")
        checked = time.perf_counter()
        the_plan.to_text()
        return checked - start, time.perf_counter() - checked, len(simulated)
    finally:
        simulator.Simulator.micro_batch = micro_batch


def allocator_at(rev: str) -> type:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:stratos_lite/planning/allocator.py"],
                            check=True, capture_output=True, text=True).stdout
    module = sys.modules["allocator_at_rev"] = types.ModuleType("allocator_at_rev")  # dataclasses look it up
    exec(compile(source, f"allocator.py at {rev}", "exec"), module.__dict__)
    return module.CachingAllocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b", choices=list(PLANNED))
    parser.add_argument("--allocator-from", help="also plan with the allocator model of this git revision")
    args = parser.parse_args()
    timed_plan(args.shape)  # warm-up: the first fake-tensor dispatches fill torch's caches
    check, alternatives, count = timed_plan(args.shape)
    print(f"{args.shape}: fit check {check:.2f} s; the alternatives {alternatives:.2f} s more; "
          f"{count} micro-batches simulated")
    if args.allocator_from:
        now = simulator.CachingAllocator
        simulator.CachingAllocator = allocator_at(args.allocator_from)
        try:
            before, before_alternatives, _ = timed_plan(args.shape)
        finally:
            simulator.CachingAllocator = now
        ratio = (check + alternatives) / (before + before_alternatives)
        print(f"allocator at {args.allocator_from}: fit check {before:.2f} s, the alternatives "
              f"{before_alternatives:.2f} s; this checkout takes {ratio:.2f}x its time")


if __name__ == "__main__":
    sys.exit(main())
