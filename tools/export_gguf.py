"""Export a model folder (plus an optional DoRA adapter, merged while writing) to one GGUF file and an
Ollama Modelfile beside it.

    python tools/export_gguf.py --model models/base --adapter runs/v2/adapter --out runs/v2/scorer-q8_0.gguf
    ollama create stratos-scorer -f runs/v2/Modelfile
"""

import argparse

from stratos_lite.cli import run
from stratos_lite.data import SYSTEM_PROMPT
from stratos_lite.gguf_export import QUANTS, export_gguf_from_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model folder")
    parser.add_argument("--adapter", help="PEFT DoRA adapter folder to merge in")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--quant", default="q8_0", choices=list(QUANTS))
    parser.add_argument("--name", default="stratos-qwen3", help="general.name in the file")
    parser.add_argument("--no-system", action="store_true", help="no SYSTEM line in the Modelfile")
    args = parser.parse_args()
    path = export_gguf_from_folder(args.model, args.out, args.adapter, args.quant, name=args.name,
                                   system_prompt=None if args.no_system else SYSTEM_PROMPT)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.with_name('Modelfile')}")


if __name__ == "__main__":
    run(main)
