"""Merge a DoRA adapter into its base model and write an HF folder.

    python tools/merge.py --base models/Qwen3-8B --adapter runs/v1/adapter --out models/v1-merged
"""

import argparse

import torch

import stratos_lite as sl
from stratos_lite.cli import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="HF model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="PEFT DoRA adapter folder (ours or PEFT's)")
    parser.add_argument("--out", required=True, help="folder to write the merged model to")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()

    model, tokenizer = sl.load_pretrained(args.base, dtype=getattr(torch, args.dtype))
    print(sl.load_adapter(model, args.adapter))
    sl.merge_dora(model)
    print(f"merged model written to {sl.save_pretrained(model, tokenizer, args.out, args.max_shard_size)}")


if __name__ == "__main__":
    run(main)
