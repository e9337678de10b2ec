"""Write the demo's synthetic train/eval JSONL and its tokenizer.

    python tools/make_demo_data.py --out runs/demo/data [--train-articles 600] [--eval-articles 60] [--seed 0]
"""

import argparse

from stratos_lite.cli import run
from stratos_lite.demo import make_demo_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo/data")
    parser.add_argument("--train-articles", type=int, default=600)
    parser.add_argument("--eval-articles", type=int, default=60)
    parser.add_argument("--profiles-per-article", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = make_demo_data(args.out, args.train_articles, args.eval_articles, args.profiles_per_article,
                           args.vocab_size, args.seed)
    for name, path in paths.items():
        print(f"{name:<10} {path}")


if __name__ == "__main__":
    run(main)
