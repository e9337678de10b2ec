"""`imatrix`: a model's importance matrix over the task's own prompts, as llama.cpp's imatrix GGUF."""

from __future__ import annotations

import argparse

from ..export.imatrix import compute_imatrix
from ._command import Command
from .evaluate import add_model_arguments, load_model_of

USAGE = """Compute the importance matrix llama.cpp's K-quants weigh their rounding by: the torch model (a merged
model, or a base with its adapter as trained) runs over the task's records, each rendered as training renders
it (the prompt it will serve and its completion), and every layer's input channels' squared activations are
summed at the positions that predict the completion (--positions all: at every position, as llama-imatrix).
Written as llama.cpp's imatrix GGUF, which `export --imatrix` and llama-quantize --imatrix read.

    stratos-lite imatrix --model models/base --adapter runs/v2/adapter --data data/train.jsonl \\
        --out runs/v2/imatrix.gguf
    stratos-lite export --model models/base --adapter runs/v2/adapter --imatrix runs/v2/imatrix.gguf \\
        --quant q3_k_m --out runs/v2/scorer-q3_k_m.gguf

--calibration takes a plain text file instead, cut into chunks of --chunk tokens as llama-imatrix cuts its input.
"""


def add_calibration_arguments(parser: argparse.ArgumentParser, option: str) -> None:
    """The matrix's sources (imatrix and export share them)."""
    parser.add_argument(option, action="append", default=[], metavar="JSONL",
                        help="the task's records (train or eval JSONL) to run the model over; repeat for several")
    parser.add_argument("--calibration", metavar="TEXT", help="a plain text file to run over instead")
    parser.add_argument("--chunk", type=int, default=512, help="with --calibration: tokens per chunk")
    parser.add_argument("--max-len", type=int, default=1024, help="records longer than this are shortened, "
                                                                   "as training shortens them")
    parser.add_argument("--positions", default="completion", choices=["completion", "all"],
                        help="the records' positions summed: those that predict the completion (default), or all")
    parser.add_argument("--limit", type=int, default=0,
                        help="at most this many records or chunks, spread evenly over them (0: all)")
    parser.add_argument("--process-output", action="store_true",
                        help="also collect the output projection's input, as llama-imatrix --process-output")


def matrix_from_arguments(args: argparse.Namespace, data: list[str]):
    model, tokenizer = load_model_of(args)
    return compute_imatrix(model, tokenizer, data, args.calibration, max_len=args.max_len, chunk=args.chunk,
                           limit=args.limit, positions=args.positions, batch_size=args.batch_size,
                           include_output=args.process_output, progress=True)


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_calibration_arguments(parser, "--data")
    parser.add_argument("--out", required=True, help="the imatrix .gguf to write")
    parser.add_argument("--batch-size", type=int, default=8)


def _main(args: argparse.Namespace) -> None:
    matrix = matrix_from_arguments(args, args.data)
    path = matrix.save(args.out)
    tokens = max(matrix.counts.values())
    print(f"wrote {path}: {len(matrix.sums)} entries over {matrix.chunk_count} sequences ({tokens} tokens)")


COMMAND = Command("the importance matrix of a model over the task's prompts, for smaller quants", USAGE,
                  _arguments, _main)
