"""K-quant export with an importance matrix against the same export without one, beside llama.cpp's quantizer
doing the same (llama-quantize with and without --imatrix), in one run.

    export STRATOS_LLAMA_TOOLS=$(bash scripts/build_llama_tools.sh)
    python benchmarks/imatrix_export_speed.py [--shape qwen3-0.6b|demo] [--quant q4_k_m] [--folder DIR]

The model has Qwen3-0.6B's shape (hidden 1024, 28 layers, 16/8 heads of 128, MLP 3072, vocabulary 151,936,
tied embeddings) or the demo's (demo.toml's [model], vocabulary 2048), random bf16 weights with a DoRA r16
adapter; the matrix is collected over 64 rendered demo
prompts of 256 tokens with the adapter on (its time is reported on its own). stratos_lite exports from the
base folder + adapter (merging on the way, as `export` does); llama.cpp quantizes the f16 GGUF of the merged
model that stratos_lite writes, with our matrix file. Each export runs in a fresh interpreter; the figure is
the ratio of with to without, for each of the two.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from export_speed import write_base_and_adapter

QWEN3_06B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
                 intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1e6)


def shape(name: str) -> dict:
    if name == "qwen3-0.6b":
        return QWEN3_06B
    from stratos_lite.demo.config import DemoConfig

    return {**QWEN3_06B, **DemoConfig().model, "vocab_size": 2048}


def write_inputs(folder: Path, config: dict) -> None:
    """The base folder, its DoRA adapter, and the importance matrix (with the seconds it took)."""
    from stratos_lite.demo.data import PROFILES
    from stratos_lite.export.imatrix import collect_imatrix

    model, tokenizer = write_base_and_adapter(folder, config)
    text = " ".join(p.text() for p in PROFILES) * 40
    ids = tokenizer.encode(text)
    sequences = [ids[i * 256:(i + 1) * 256] for i in range(64)]
    start = time.perf_counter()
    matrix = collect_imatrix(model, sequences, batch_size=8)
    seconds = time.perf_counter() - start
    matrix.save(folder / "imatrix.gguf")
    (folder / "imatrix_seconds.json").write_text(json.dumps({"seconds": seconds, "tokens": 64 * 256}))


def ours(folder: Path, quant: str, with_matrix: bool) -> float:
    from stratos_lite.export.gguf_file import export_gguf_from_folder
    from stratos_lite.export.imatrix_file import ImportanceMatrix

    matrix = ImportanceMatrix.load(folder / "imatrix.gguf") if with_matrix else None
    start = time.perf_counter()
    export_gguf_from_folder(folder / "base", folder / "out.gguf", folder / "adapter", quant=quant, modelfile=False,
                            imatrix=matrix)
    return time.perf_counter() - start


def llama_quantize(folder: Path, quant: str, with_matrix: bool) -> float:
    import llama_oracle

    from stratos_lite.export.gguf_file import export_gguf_from_folder

    f16 = folder / "merged-f16.gguf"
    if not f16.is_file():
        export_gguf_from_folder(folder / "base", f16, folder / "adapter", quant="f16", modelfile=False)
    options = ["--imatrix", folder / "imatrix.gguf"] if with_matrix else []
    start = time.perf_counter()
    llama_oracle.run_tool("llama-quantize", *options, f16, folder / "out.gguf", quant.upper(), 2)
    return time.perf_counter() - start


def child(route: str, folder: Path, quant: str, with_matrix: bool) -> None:
    seconds = (ours if route == "ours" else llama_quantize)(folder, quant, with_matrix)
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", choices=["qwen3-0.6b", "demo"])
    parser.add_argument("--folder", type=Path, help="where the inputs are made once (default /tmp/sl_imatrix_SHAPE)")
    parser.add_argument("--quant", default="q4_k_m", choices=["q6_k", "q5_k_m", "q4_k_m", "q3_k_m"])
    parser.add_argument("--child", choices=["ours", "llama"])
    parser.add_argument("--with-matrix", action="store_true")
    args = parser.parse_args()
    args.folder = args.folder or Path(f"/tmp/sl_imatrix_{args.shape}")
    if args.child:
        return child(args.child, args.folder, args.quant, args.with_matrix)
    if not (args.folder / "imatrix.gguf").is_file():
        write_inputs(args.folder, shape(args.shape))
    collected = json.loads((args.folder / "imatrix_seconds.json").read_text())
    print(f"{args.shape} shape, DoRA r16, {args.quant}; matrix collected over {collected['tokens']} tokens in "
          f"{collected['seconds']:.1f} s")
    times = {}
    for route in ("llama", "ours"):
        for with_matrix in (False, True):
            command = [sys.executable, __file__, "--child", route, "--folder", str(args.folder), "--quant", args.quant]
            out = subprocess.run(command + (["--with-matrix"] if with_matrix else []), check=True,
                                 capture_output=True, text=True).stdout
            times[route, with_matrix] = json.loads(out.strip().splitlines()[-1])["seconds"]
    for route, label in (("llama", "llama-quantize (f16 GGUF in)"), ("ours", "stratos_lite (folder + adapter in)")):
        plain, weighted = times[route, False], times[route, True]
        print(f"{label}: without {plain:.1f} s, with the matrix {weighted:.1f} s, ratio {weighted / plain:.2f}x")


if __name__ == "__main__":
    main()
