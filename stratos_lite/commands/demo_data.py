"""`make-demo-data`: the demo's synthetic train/eval JSONL and its tokenizer, alone."""

from __future__ import annotations

import argparse

from ..demo.data import make_demo_data
from ._command import Command

USAGE = """Write the demo's synthetic train/eval JSONL and its tokenizer.

    stratos-lite make-demo-data --out runs/demo/data [--train-articles 600] [--eval-articles 60] [--seed 0]
"""


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo/data")
    parser.add_argument("--train-articles", type=int, default=600)
    parser.add_argument("--eval-articles", type=int, default=60)
    parser.add_argument("--profiles-per-article", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)


def _main(args: argparse.Namespace) -> None:
    paths = make_demo_data(args.out, args.train_articles, args.eval_articles, args.profiles_per_article,
                           args.vocab_size, args.seed)
    for name, path in paths.items():
        print(f"{name:<10} {path}")


COMMAND = Command("write the demo's synthetic data and tokenizer", USAGE, _arguments, _main)
