"""`export`: a model folder (+ adapter) to GGUF files and an Ollama Modelfile, optionally scored per quant."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.task import SYSTEM_PROMPT
from ..evaluation.evaluate import evaluate
from ..export.errors import ExportError
from ..export.gguf_file import QUANTS, export_gguf_from_folder
from ..export.imatrix_file import ImportanceMatrix
from ..export.lora_gguf import ADAPTER_TYPES, export_lora_gguf
from ..export.modelfile import write_modelfile
from ..export.quant_choice import SPEARMAN_TOLERANCE, format_quant_table, quant_files, smallest_within
from ..model.folders import folder_dtype, load_pretrained_with_adapter
from ._command import Command
from .evaluate import add_model_arguments, load_model_of
from .imatrix import add_calibration_arguments, matrix_from_arguments

USAGE = """Export a model folder (plus an optional DoRA adapter, merged while writing) to GGUF and an Ollama
Modelfile beside it.

    stratos-lite export --model models/base --adapter runs/v2/adapter --out runs/v2/scorer-q8_0.gguf
    ollama create stratos-scorer -f runs/v2/Modelfile

Several quants at once, each scored on held-out data in llama.cpp beside the torch model, to ship the
smallest that scores as well (files named scorer-q8_0.gguf, scorer-q4_k_m.gguf, ...; the Modelfile points
at the chosen one):

    stratos-lite export --model models/base --adapter runs/v2/adapter --out runs/v2/scorer.gguf \\
        --quant q8_0,q6_k,q4_k_m --eval-data data/eval.jsonl

--dtype and --device apply to the torch model scored beside the files.

With an importance matrix (`stratos-lite imatrix`, or computed here from the task's records with
--imatrix-data) the K-quants (q3_k_m to q6_k) weigh their rounding by it, as llama-quantize --imatrix does;
--also-without writes each K-quant without it too (NAME-QUANT.gguf beside NAME-QUANT-imatrix.gguf), so the
scored table shows what the matrix buys:

    stratos-lite export --model models/base --adapter runs/v2/adapter --out runs/v2/scorer.gguf \
        --quant q8_0,q4_k_m,q3_k_m --imatrix-data data/train.jsonl --also-without --eval-data data/eval.jsonl

A LoRA adapter can ship as an adapter instead: a llama.cpp adapter GGUF of a few MB that llama.cpp (--lora)
and Ollama (ADAPTER) apply over the base model's GGUF, exported once for every variant; the Modelfile beside
the adapter says FROM the base and ADAPTER the adapter (a DoRA adapter cannot ship this way: merge it):

    stratos-lite export --model models/base --out models/base-q8_0.gguf
    stratos-lite export --model models/base --adapter runs/v2/adapter --adapter-only \
        --base-gguf models/base-q8_0.gguf --out runs/v2/adapter.gguf
"""


def _quant_list(text: str) -> list[str]:
    quants = [q.strip() for q in text.split(",") if q.strip()]
    unknown = [q for q in quants if q not in QUANTS]
    if unknown or not quants:
        raise argparse.ArgumentTypeError(f"unknown quant {unknown[0] if unknown else text!r}; "
                                         f"known: {', '.join(QUANTS)} (comma-separated for several)")
    return list(dict.fromkeys(quants))


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="the .gguf file to write (with several quants: the name "
                                                     "each file's is made from, NAME-QUANT.gguf)")
    parser.add_argument("--quant", default=["q8_0"], type=_quant_list,
                        help=f"one of {', '.join(QUANTS)}, or several separated by commas")
    parser.add_argument("--name", default="stratos-qwen3", help="general.name in the file")
    parser.add_argument("--no-system", action="store_true", help="no SYSTEM line in the Modelfile")
    parser.add_argument("--eval-data", help="score every file on this eval JSONL beside the torch model")
    parser.add_argument("--eval-out", help="where the evaluation goes (default: OUT's folder/quant_eval)")
    parser.add_argument("--tolerance", type=float, default=SPEARMAN_TOLERANCE,
                        help="how far below the torch model's Spearman a file may score and still be chosen")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--adapter-only", action="store_true",
                        help="write --adapter (LoRA) as a llama.cpp adapter GGUF, not merged into the model")
    parser.add_argument("--base-gguf", help="with --adapter-only: the base model's GGUF the adapter goes over "
                                            "(checked against it, and named by the Modelfile's FROM)")
    parser.add_argument("--adapter-dtype", default="f16", choices=list(ADAPTER_TYPES),
                        help="with --adapter-only: the adapter's tensors in f16 or f32")
    parser.add_argument("--imatrix", metavar="FILE", help="an importance matrix GGUF for the K-quants")
    add_calibration_arguments(parser, "--imatrix-data")
    parser.add_argument("--also-without", action="store_true",
                        help="with a matrix: also write each K-quant without it, to compare the two")


def _matrix(args: argparse.Namespace) -> ImportanceMatrix | None:
    """The importance matrix asked for: read from --imatrix, or computed from --imatrix-data / --calibration
    and saved beside --out as NAME.imatrix.gguf."""
    if args.imatrix and (args.imatrix_data or args.calibration):
        raise ExportError("give either --imatrix (a matrix file) or --imatrix-data / --calibration (compute one), "
                          "not both")
    if args.imatrix:
        return ImportanceMatrix.load(args.imatrix)
    if not (args.imatrix_data or args.calibration):
        if args.also_without:
            raise ExportError("--also-without compares files with and without a matrix: give --imatrix or "
                              "--imatrix-data")
        return None
    matrix = matrix_from_arguments(args, args.imatrix_data)
    out = Path(args.out)
    path = matrix.save(out.with_name(f"{out.stem}.imatrix.gguf"))
    print(f"wrote {path} ({len(matrix.sums)} entries over {matrix.chunk_count} sequences)")
    return matrix


def _export_adapter(args: argparse.Namespace, system: str | None) -> None:
    if not args.adapter or not args.base_gguf:
        raise ExportError("--adapter-only writes an adapter: give --adapter (a LoRA adapter folder) and --base-gguf "
                          "(the base model's GGUF: stratos-lite export --model FOLDER --out BASE.gguf)")
    model, _ = load_pretrained_with_adapter(args.model, args.adapter, folder_dtype(args.model))
    path = export_lora_gguf(model, args.out, args.base_gguf, args.adapter_dtype, args.name, system)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.with_name('Modelfile')} "
          f"(FROM {args.base_gguf}, ADAPTER ./{path.name})")


def _main(args: argparse.Namespace) -> None:
    system = None if args.no_system else SYSTEM_PROMPT
    if args.adapter_only:
        return _export_adapter(args, system)
    matrix = _matrix(args)
    jobs = quant_files(args.out, args.quant, matrix is not None, args.also_without)
    for quant, path, with_matrix in jobs:
        export_gguf_from_folder(args.model, path, args.adapter, quant, name=args.name, modelfile=False,
                                imatrix=matrix if with_matrix else None)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    paths = [path for _, path, _ in jobs]
    chosen = paths[0]
    write_modelfile(chosen, system)  # in place before scoring: the served-prompt checks read it
    if args.eval_data:
        model, tokenizer = load_model_of(args)
        result = evaluate(model, tokenizer, args.eval_data, args.eval_out or paths[0].parent / "quant_eval",
                          compare_adapters_off=False, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          gguf=paths)
        print(format_quant_table(result, args.tolerance))
        best = smallest_within(result, args.tolerance)
        chosen = best.path if best else chosen
        write_modelfile(chosen, system)
    print(f"wrote {chosen.with_name('Modelfile')} (FROM ./{chosen.name})")


COMMAND = Command("export a model (+ adapter) to GGUF files with an Ollama Modelfile, optionally scoring each "
                  "quant", USAGE, _arguments, _main)
