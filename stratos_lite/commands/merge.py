"""`merge`: fold a LoRA or DoRA adapter into its base and write an HF folder."""

from __future__ import annotations

import argparse

import torch

from ..model.folders import load_pretrained, save_pretrained
from ..model.lora import merge_adapters
from ..model.peft_files import load_adapter
from ._command import Command

USAGE = """Merge a LoRA or DoRA adapter into its base model and write an HF folder.

    stratos-lite merge --base models/Qwen3-8B --adapter runs/v1/adapter --out models/v1-merged
"""


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="HF model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA or DoRA adapter folder (ours or PEFT's)")
    parser.add_argument("--out", required=True, help="folder to write the merged model to")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-shard-size", default="5GB")


def _main(args: argparse.Namespace) -> None:
    model, tokenizer = load_pretrained(args.base, dtype=getattr(torch, args.dtype))
    print(load_adapter(model, args.adapter))
    merge_adapters(model)
    print(f"merged model written to {save_pretrained(model, tokenizer, args.out, args.max_shard_size)}")


COMMAND = Command("merge a LoRA or DoRA adapter into its base model (an HF folder transformers loads)", USAGE,
                  _arguments, _main)
