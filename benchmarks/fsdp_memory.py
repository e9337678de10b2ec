"""Per-rank peak memory and step time: one process, 2-rank DDP and 2-rank FSDP, same global batch.

    python benchmarks/fsdp_memory.py [--seq 256] [--steps 3]

Qwen3-0.6B's shape (596 M parameters, random bf16 weights), DoRA r16 on all 7 linears, bf16 autocast,
gradient checkpointing (layer), global batch 2 x accumulation 2: one process with batch 2, or two ranks
(torchrun, gloo, one thread each) with batch 1. Each process reports its peak RSS growth over the RSS
before the model was built (CPU) or max_memory_allocated (GPU), and the median step time after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from step_speed import SHAPES, examples

import stratos_lite as sl
from stratos_lite.run import default_device

STRATEGIES = ("one process", "ddp", "fsdp")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(out_dir: str, strategy: str, seq: int, steps: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = default_device()
    before = rss()
    torch.manual_seed(0)  # the same random weights on every rank
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config(**SHAPES["qwen3-0.6b"]))
    torch.set_default_dtype(torch.float32)
    model.to_empty(device=device).tie_weights()
    model.initialize_weights()
    sl.apply_dora(model, 16, 32, 0.05)
    config = sl.TrainConfig(out_dir=out_dir, batch_size=2 // world, grad_accum=2, max_steps=steps, max_len=seq,
                            dtype="bfloat16", band_sampling=False, verify_batches=0, save_every=10**9,
                            progress=False, strategy="fsdp" if strategy == "fsdp" else "ddp")
    trainer = sl.Trainer(model, examples(SHAPES["qwen3-0.6b"]["vocab_size"], seq, 16), config)
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    report = {"rank": trainer.rank, "peak": peak}
    if trainer.rank == 0:
        lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
        report["step_seconds"] = statistics.median(json.loads(line)["step_seconds"] for line in lines[1:])
    (Path(out_dir) / f"rank{trainer.rank}.json").write_text(json.dumps(report))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(strategy: str, out_dir: str, seq: int, steps: int) -> list[dict]:
    args = [__file__, "--worker", strategy, "--out", out_dir, "--seq", str(seq), "--steps", str(steps)]
    if strategy == "one process":
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if strategy != "one process" else str(os.cpu_count())}
    subprocess.run(command, check=True, capture_output=True, env=env)
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.out, args.worker, args.seq, args.steps)
    print(f"qwen3-0.6b shape, DoRA r16, bf16, seq {args.seq}, global batch 2 x accumulation 2, {args.steps} steps; "
          f"torch {torch.__version__}")
    print("| strategy | peak per rank (GB) | s/step |\n|---|---|---|")
    for strategy in STRATEGIES:
        with tempfile.TemporaryDirectory() as out_dir:
            reports = launch(strategy, out_dir, args.seq, args.steps)
        peaks = " / ".join(f"{r['peak'] / 1e9:.2f}" for r in reports)
        seconds = next(r["step_seconds"] for r in reports if "step_seconds" in r)
        print(f"| {strategy} | {peaks} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
