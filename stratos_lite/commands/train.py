"""Training commands: `train` (planned first, resumable), `plan` (the plan alone) and `demo`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import TrainConfig, settings_help
from ..data.dataset import RunData
from ..demo.config import DEMO_TOML, DemoConfig
from ..demo.run import run_demo
from ..planning.planner import check_fits, plan
from ..planning.probe import probe
from ..planning.report import DataShape
from ..train.run import train_from_config
from ..train.strategy import exit_distributed
from ._command import Command

TRAIN_USAGE = """Train a DoRA adapter (or the whole model) on scored JSONL data, or run the embedded demo.

    stratos-lite train                                             # the whole demo pipeline -> runs/demo
    stratos-lite train --config configs/v2_scorer.toml [--set key=value ...]
    stratos-lite train --config FILE --plan [--probe 3] [--memory 24GB]   # will it fit, how long?
    torchrun --nproc_per_node N -m stratos_lite train --config FILE       # data parallel

Every run is planned first (memory per rank, without loading weights) and stops before loading when the
plan does not fit. A training run resumes from the newest checkpoint in its out_dir when there is one.
"""

PLAN_USAGE = """Will it fit, and how long will it take? The plan of a training run, made before loading weights.

    stratos-lite plan --config configs/v2_scorer.toml --set model=models/Qwen3-8B --memory 24GB
    stratos-lite plan --config FILE --probe 3        # + 3 real steps, timed, and the run's projected time
"""

DEMO_USAGE = """The whole pipeline on the embedded demo, on a CPU in a few minutes: synthetic data, a small Qwen3
base that reads profiles but answers blind to them (shipped with the package, made by tools/make_demo_base.py),
DoRA with the V2 recipe, q8_0 and q4_k_m GGUFs, evaluation with the adapters off and on (and of each GGUF in
llama.cpp when it is installed), a merged model folder.

    stratos-lite demo                       # outputs under runs/demo
    stratos-lite demo --demo-config my.toml # a file of changes over stratos_lite/demo.toml, e.g. seed = 1
                                            # (vendored_base = false: train the base in the run too)
"""


def _recipe_arguments(parser: argparse.ArgumentParser, config_required: bool) -> None:
    without = "" if config_required else " (without it: the demo)"
    parser.add_argument("--config", required=config_required, help=f"a TOML file of TrainConfig settings{without}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (repeatable), e.g. --set lr=2e-5")
    parser.add_argument("--probe", type=int, default=0, metavar="N",
                        help="with the plan: time N real steps and project the run's wall time")
    parser.add_argument("--memory", help="plan against this much memory (e.g. 24GB) instead of this device's")
    parser.add_argument("--ranks", type=int, help="plan per rank for this many ranks (default: torchrun's WORLD_SIZE)")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo-config", default=str(DEMO_TOML),
                        help="a TOML file over the demo's settings (stratos_lite/demo.toml), e.g. seed = 1")
    parser.add_argument("--reuse", action="store_true", help="demo: keep what an earlier run left in its out_dir")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _recipe_arguments(parser, config_required=False)
    parser.add_argument("--plan", action="store_true", help="print the memory and time plan and stop")
    parser.add_argument("--no-plan-check", action="store_true", help="train even when the plan says it won't fit")
    _demo_arguments(parser)


def _plan_of(args: argparse.Namespace, config: TrainConfig, data: RunData | None):
    world_size = args.ranks or int(os.environ.get("WORLD_SIZE", "1"))
    return plan(config, memory=args.memory, world_size=world_size,
                data=DataShape.of(data.train) if data is not None else None)


def _train(args: argparse.Namespace) -> None:
    if not args.config:
        _demo(args)
        return
    config = TrainConfig.from_toml(args.config, args.set)
    # Read once: the plan takes its lengths, training the examples. A plan alone may go without (worst case).
    data = None if args.plan and not Path(config.train_data).is_file() else RunData.read(config, not args.plan)
    if args.plan:
        _print_plan(args, config, data)
        return
    if not args.no_plan_check:
        check_fits(_plan_of(args, config, data))
    result = train_from_config(config, data)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; outputs in {result.out_dir}")
    exit_distributed()


def _print_plan(args: argparse.Namespace, config: TrainConfig, data: RunData | None) -> None:
    the_plan = _plan_of(args, config, data)
    if args.probe:
        probe(config, args.probe, the_plan)
    print(the_plan)


def _plan(args: argparse.Namespace) -> None:
    config = TrainConfig.from_toml(args.config, args.set)
    _print_plan(args, config, RunData.read(config, evaluation=False) if Path(config.train_data).is_file() else None)


def _demo(args: argparse.Namespace) -> None:
    run_demo(DemoConfig.from_toml(args.demo_config), reuse=args.reuse)


TRAIN = Command("train a DoRA adapter or a whole model from a TOML recipe (no --config: the demo)", TRAIN_USAGE,
                _train_arguments, _train, epilog=settings_help)
PLAN = Command("memory and time of a training run, before loading weights", PLAN_USAGE,
               lambda parser: _recipe_arguments(parser, config_required=True), _plan, epilog=settings_help)
DEMO = Command("the whole pipeline on the embedded demo (a few minutes on a CPU)", DEMO_USAGE, _demo_arguments, _demo)
