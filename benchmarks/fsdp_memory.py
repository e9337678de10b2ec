"""Per-rank peak memory and step time: one process, 2-rank DDP and 2-rank FSDP, same global batch.

    python benchmarks/fsdp_memory.py [--seq 256] [--steps 3]

Qwen3-0.6B's shape (596 M parameters, random bf16 weights), DoRA r16 on all 7 linears, bf16 autocast,
gradient checkpointing (layer), global batch 2 x accumulation 2: one process with batch 2, or two ranks
(torchrun, gloo, one thread each) with batch 1. Each process reports its peak RSS growth over the RSS
before the model was loaded (CPU) or max_memory_allocated (GPU), the bytes of parameters it holds (its
shards under FSDP), and the median step time after the first. The model is a random bf16 HF folder
loaded as tools/train.py loads it (prepare_model; under FSDP each rank reading only its rows).
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
from stratos_lite.model.shards import local
from stratos_lite.planning.report import DataShape
from stratos_lite.train.device import default_device
from stratos_lite.train.strategy import exit_distributed

STRATEGIES = ("one process", "ddp", "fsdp")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(folder: str, out_dir: str, strategy: str, seq: int, steps: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = default_device()
    config = sl.TrainConfig(model=folder, out_dir=out_dir, batch_size=2 // world, grad_accum=2, max_steps=steps,
                            max_len=seq, dtype="bfloat16", band_sampling=False, verify_batches=0,
                            save_every=10**9, progress=False, strategy="fsdp" if strategy == "fsdp" else "ddp")
    before = rss()
    model = sl.prepare_model(config, device)  # what tools/train.py does: under FSDP no rank holds the whole model
    parameters = sum(local(p).numel() * p.element_size() for p in model.parameters())
    trainer = sl.Trainer(model, examples(SHAPES["qwen3-0.6b"]["vocab_size"], seq, 16), config)
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    rank = trainer.strategy.process_rank
    report = {"rank": rank, "peak": peak, "parameters": parameters}
    if rank == 0:
        lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
        report["step_seconds"] = statistics.median(json.loads(line)["step_seconds"] for line in lines[1:])
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    exit_distributed()


def write_model(folder: Path) -> None:
    """Qwen3-0.6B's shape with random bf16 weights, as an HF folder (sharded, as real checkpoints are)."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config(**SHAPES["qwen3-0.6b"]))
    torch.set_default_dtype(torch.float32)
    model.to_empty(device="cpu").tie_weights()
    model.initialize_weights()
    sl.save_pretrained(model, None, folder, max_shard_size="400MB")


def predicted(strategy: str, seq: int) -> int:
    """The plan's per-rank peak for the same run (live tensors; nothing loaded)."""
    world = 1 if strategy == "one process" else 2
    config = sl.TrainConfig(batch_size=2 // world, grad_accum=2, max_len=seq, dtype="bfloat16",
                            strategy="fsdp" if strategy == "fsdp" else "ddp")
    data = DataShape(examples=16, longest=seq, longest_completion=seq // 5, mean_tokens=seq, source="synthetic")
    return sl.plan(config, model_config=sl.Qwen3Config(**SHAPES["qwen3-0.6b"]), data=data, world_size=world,
                   memory="64GB").peak


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(strategy: str, folder: str, out_dir: str, seq: int, steps: int) -> list[dict]:
    args = [__file__, "--worker", strategy, "--model", folder, "--out", out_dir, "--seq", str(seq),
            "--steps", str(steps)]
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
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.model, args.out, args.worker, args.seq, args.steps)
    print(f"qwen3-0.6b shape, DoRA r16, bf16, seq {args.seq}, global batch 2 x accumulation 2, {args.steps} steps; "
          f"torch {torch.__version__}")
    print("| strategy | parameters per rank (GB) | plan per rank (GB) | peak per rank (GB) | s/step |\n"
          "|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        write_model(Path(work) / "model")
        for strategy in STRATEGIES:
            out_dir = Path(work) / strategy.replace(" ", "_")
            reports = launch(strategy, str(Path(work) / "model"), str(out_dir), args.seq, args.steps)
            params = " / ".join(f"{r['parameters'] / 1e9:.2f}" for r in reports)
            peaks = " / ".join(f"{r['peak'] / 1e9:.2f}" for r in reports)
            seconds = next(r["step_seconds"] for r in reports if "step_seconds" in r)
            print(f"| {strategy} | {params} | {predicted(strategy, args.seq) / 1e9:.2f} | {peaks} | {seconds:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
