"""Train a DoRA adapter (or the whole model) on scored JSONL data, or run the embedded demo.

    python tools/train.py                                          # the whole demo pipeline -> runs/demo
    python tools/train.py --config configs/v2_scorer.toml [--set key=value ...]
    torchrun --nproc_per_node N tools/train.py --config FILE       # data parallel

A training run resumes from the newest checkpoint in its out_dir when there is one.
"""

import argparse
import os
from pathlib import Path

import torch

import stratos_lite as sl
from stratos_lite.cli import run
from stratos_lite.demo_run import DemoConfig, run_demo

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"


def device() -> torch.device:
    if torch.cuda.is_available():  # ROCm builds answer here too
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def train_from_config(config: sl.TrainConfig) -> sl.TrainResult:
    # A frozen base is stored in the compute dtype; trained weights (mode "full") stay in fp32.
    dtype = sl.compute_dtype(config.dtype, device()) if config.mode == "dora" else torch.float32
    model, tokenizer = sl.load_pretrained(config.model, dtype=dtype, device=device())
    if config.mode == "dora":
        print(sl.apply_dora(model, config.rank, config.alpha, config.dropout, config.targets, seed=config.seed))
    train = sl.ScoredDataset.from_jsonl(config.train_data, tokenizer, max_len=config.max_len)
    train.report.write(config.out_dir)
    print(train.report.to_markdown())
    evaluation = (sl.ScoredDataset.from_jsonl(config.eval_data, tokenizer, max_len=config.max_len)
                  if config.eval_data and config.eval_every else None)
    return sl.Trainer(model, train, config, eval_dataset=evaluation, pad_id=tokenizer.pad_id).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a TOML file of TrainConfig settings (without it: the demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (repeatable), e.g. --set lr=2e-5")
    parser.add_argument("--demo-config", default=str(DEMO_CONFIG), help="the demo's settings (configs/demo.toml)")
    parser.add_argument("--reuse", action="store_true", help="demo: keep what an earlier run left in its out_dir")
    args = parser.parse_args()
    if not args.config:
        run_demo(DemoConfig.from_toml(args.demo_config), reuse=args.reuse)
        return
    result = train_from_config(sl.TrainConfig.from_toml(args.config, args.set))
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; outputs in {result.out_dir}")


if __name__ == "__main__":
    run(main)
