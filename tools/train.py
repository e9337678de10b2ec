"""Train a DoRA adapter (or the whole model) on scored JSONL data, or run the embedded demo.

    python tools/train.py                                          # the whole demo pipeline -> runs/demo
    python tools/train.py --config configs/v2_scorer.toml [--set key=value ...]
    python tools/train.py --config FILE --plan [--probe 3] [--memory 24GB]   # will it fit, how long?
    torchrun --nproc_per_node N tools/train.py --config FILE       # data parallel

Every run is planned first (memory per rank, without loading weights) and stops before loading when the
plan does not fit. A training run resumes from the newest checkpoint in its out_dir when there is one.
"""

import argparse
import os
from pathlib import Path

import stratos_lite as sl
from stratos_lite.cli import run
from stratos_lite.data import read_training_data
from stratos_lite.demo_run import DEMO_TOML, DemoConfig, run_demo
from stratos_lite.distributed import exit_distributed
from stratos_lite.plan import DataShape, check_fits
from stratos_lite.run import probe, train_from_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a TOML file of TrainConfig settings (without it: the demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (repeatable), e.g. --set lr=2e-5")
    parser.add_argument("--plan", action="store_true", help="print the memory and time plan and stop")
    parser.add_argument("--probe", type=int, default=0, metavar="N",
                        help="with --plan: time N real steps and project the run's wall time")
    parser.add_argument("--memory", help="plan against this much memory (e.g. 24GB) instead of this device's")
    parser.add_argument("--ranks", type=int, help="plan per rank for this many ranks (default: torchrun's WORLD_SIZE)")
    parser.add_argument("--no-plan-check", action="store_true", help="train even when the plan says it won't fit")
    parser.add_argument("--demo-config", default=str(DEMO_TOML),
                        help="a TOML file over the demo's settings (stratos_lite/demo.toml), e.g. seed = 1")
    parser.add_argument("--reuse", action="store_true", help="demo: keep what an earlier run left in its out_dir")
    args = parser.parse_args()
    if not args.config:
        run_demo(DemoConfig.from_toml(args.demo_config), reuse=args.reuse)
        return
    config = sl.TrainConfig.from_toml(args.config, args.set)
    world_size = args.ranks or int(os.environ.get("WORLD_SIZE", "1"))
    # Read once: the plan takes its lengths, training the examples. A plan alone may go without (worst case).
    train = None if args.plan and not Path(config.train_data).is_file() else read_training_data(config)
    if args.plan or not args.no_plan_check:
        data = DataShape.of(train) if train is not None else None
        the_plan = sl.plan(config, memory=args.memory, world_size=world_size, data=data)
        if args.plan:
            if args.probe:
                probe(config, args.probe, the_plan)
            print(the_plan)
            return
        check_fits(the_plan)
    result = train_from_config(config, train=train)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; outputs in {result.out_dir}")
    exit_distributed()


if __name__ == "__main__":
    run(main)
