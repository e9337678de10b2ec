"""`evaluate`: score a model by generation on an eval JSONL and write the report."""

from __future__ import annotations

import argparse

import torch

from ..evaluation.evaluate import evaluate
from ..model.folders import load_pretrained_with_adapter
from ._command import Command

USAGE = """Evaluate a model by generation on an eval JSONL: predictions.jsonl, metrics.json, eval_report.md.

    stratos-lite evaluate --model models/base --adapter runs/v2/adapter --eval-data data/eval.jsonl \\
        --out runs/v2/eval [--baseline runs/v1/eval/predictions.jsonl] [--gguf runs/v2/scorer-q8_0.gguf ...]

With an adapter, the profile-awareness articles are also scored with the adapter off, side by side. An adapter
trained with base_quant = "nf4" is scored on the 4-bit base it trained on with --base-quant nf4; run again
without it and with --baseline OUT/predictions.jsonl to see the bf16 base (what merge and export ship) beside it.
Each --gguf file runs the same prompts through llama.cpp (pip install 'stratos_lite[gguf]') as a column of its
own, with its agreement with the torch model and a check of the prompts servers build from it; each
--gguf-lora BASE ADAPTER pair does the same with a LoRA adapter GGUF (export --adapter-only) over a base GGUF:

    stratos-lite evaluate --model models/base --adapter runs/v2/adapter --eval-data data/eval.jsonl \
        --out runs/v2/eval --gguf-lora models/base-q8_0.gguf runs/v2/adapter.gguf
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --dtype, --device: the model a command loads (evaluate and score share them)."""
    parser.add_argument("--model", required=True, help="HF model folder (a merged model, or the adapter's base)")
    parser.add_argument("--adapter", help="PEFT LoRA or DoRA adapter folder to apply on top of --model")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base-quant", default="none", choices=["none", "nf4"],
                        help="nf4: the adapter on its base quantized to 4 bits, as a base_quant = 'nf4' run trained it")


def load_model_of(args: argparse.Namespace):
    return load_pretrained_with_adapter(args.model, args.adapter, getattr(torch, args.dtype), args.device,
                                        args.base_quant)


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--baseline", help="predictions.jsonl of another model, for a two-column report")
    parser.add_argument("--threshold", type=float, default=5.0, help="direction accuracy threshold")
    parser.add_argument("--spread-articles", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows")
    parser.add_argument("--gguf", action="append", default=[], metavar="FILE",
                        help="an exported GGUF to evaluate in llama.cpp beside the torch model (repeatable)")
    parser.add_argument("--gguf-lora", action="append", default=[], nargs=2, metavar=("BASE", "ADAPTER"),
                        help="a base GGUF with a LoRA adapter GGUF applied over it, scored the same way (repeatable)")
    parser.add_argument("--tensorboard", metavar="FOLDER",
                        help="add the metrics to TensorBoard event files here (e.g. runs/v2/tensorboard)")
    parser.add_argument("--step", type=int, default=0, help="with --tensorboard: the step to log them at")


def _main(args: argparse.Namespace) -> None:
    model, tokenizer = load_model_of(args)
    result = evaluate(model, tokenizer, args.eval_data, args.out, baseline=args.baseline,
                      compare_adapters_off=bool(args.adapter), spread_articles=args.spread_articles,
                      threshold=args.threshold, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      limit=args.limit, gguf=args.gguf, gguf_lora=[tuple(pair) for pair in args.gguf_lora],
                      tensorboard=args.tensorboard, step=args.step)
    for name, row in {"torch": result, **result.get("engines", {})}.items():
        print(f"{name}: direction accuracy {row['direction_accuracy']}, MAE {row['mae']}, Spearman {row['spearman']}, "
              f"parse failures {row['parse_failures']}/{row['examples']}, {row['examples_per_s']:.2f} examples/s")
    print(f"report in {args.out}/eval_report.md")


COMMAND = Command("evaluate a model (and exported GGUFs) by generation on held-out data", USAGE, _arguments, _main)
