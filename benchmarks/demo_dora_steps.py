"""How many DoRA steps the demo needs: the DoRA phase alone, on the base model of a finished demo run, for a
given number of steps, then the held-out evaluation.

    python tools/train.py                                     # a full demo run first (runs/demo)
    python benchmarks/demo_dora_steps.py --steps 150 --grad-accum 1

Everything else is the demo's DoRA phase (stratos_lite/demo.toml); the base is runs/demo/base_model.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

import stratos_lite as sl
from stratos_lite.demo.config import DemoConfig, phase_config
from stratos_lite.evaluation.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="a finished demo run")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--out", default="/tmp/demo_dora_steps")
    args = parser.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    config = DemoConfig.from_toml()
    config.out_dir = str(out)
    config.dora = {**config.dora, "max_steps": args.steps, "grad_accum": args.grad_accum, "save_every": 10**6,
                   "progress": False}
    phase = phase_config(config, "dora")
    start = time.perf_counter()
    model, tokenizer = sl.load_pretrained(demo / "base_model", dtype=torch.float32)
    train = sl.ScoredDataset.from_jsonl(demo / "data" / "train.jsonl", tokenizer, max_len=phase.max_len)
    sl.apply_dora(model, phase.rank, phase.alpha, phase.dropout, phase.targets, seed=phase.seed)
    sl.Trainer(model, train, phase, pad_id=tokenizer.pad_id).train()
    seconds = time.perf_counter() - start
    result = evaluate(model.eval(), tokenizer, demo / "data" / "eval.jsonl", out / "eval", progress=False,
                      compare_adapters_off=False, batch_size=config.eval["batch_size"],
                      max_new_tokens=config.eval["max_new_tokens"])
    print(f"{args.steps} DoRA steps of {phase.batch_size} x {phase.grad_accum} in {seconds:.0f} s: held-out "
          f"Spearman {result['spearman']}, MAE {result['mae']:.3f}, parse failures {result['parse_failures']}")


if __name__ == "__main__":
    main()
