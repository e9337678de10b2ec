"""`export`: a model folder (+ adapter) to one GGUF file and an Ollama Modelfile."""

from __future__ import annotations

import argparse

from ..data import SYSTEM_PROMPT
from ..gguf_export import QUANTS, export_gguf_from_folder
from ._command import Command

USAGE = """Export a model folder (plus an optional DoRA adapter, merged while writing) to one GGUF file and an
Ollama Modelfile beside it.

    stratos-lite export --model models/base --adapter runs/v2/adapter --out runs/v2/scorer-q8_0.gguf
    ollama create stratos-scorer -f runs/v2/Modelfile
"""


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model folder")
    parser.add_argument("--adapter", help="PEFT DoRA adapter folder to merge in")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--quant", default="q8_0", choices=list(QUANTS))
    parser.add_argument("--name", default="stratos-qwen3", help="general.name in the file")
    parser.add_argument("--no-system", action="store_true", help="no SYSTEM line in the Modelfile")


def _main(args: argparse.Namespace) -> None:
    path = export_gguf_from_folder(args.model, args.out, args.adapter, args.quant, name=args.name,
                                   system_prompt=None if args.no_system else SYSTEM_PROMPT)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.with_name('Modelfile')}")


COMMAND = Command("export a model (+ adapter) to a GGUF file with an Ollama Modelfile", USAGE, _arguments, _main)
