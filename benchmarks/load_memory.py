"""Load time and peak memory of a sharded bf16 checkpoint: stratos_lite against transformers.

Each load runs in a fresh interpreter; peak RSS is measured after every weight has been read (summed),
minus the RSS the interpreter had before loading. Usage:

    python benchmarks/load_memory.py [--params 560e6] [--folder /tmp/sl_load_bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def bench_config(params: float) -> dict:
    """A Qwen3-shaped config (hidden 2048, GQA 16/8, head_dim 128) with about `params` parameters."""
    hidden, inter, vocab = 2048, 6144, 32768
    per_layer = hidden * 128 * (16 + 8 + 8) + 16 * 128 * hidden + 3 * hidden * inter
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)


def write_checkpoint(folder: Path, params: float) -> None:
    from stratos_lite import Qwen3Config, Qwen3ForCausalLM, save_pretrained

    config = Qwen3Config.from_dict(bench_config(params))
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_pretrained(model, None, folder, max_shard_size="400MB")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(kind: str, folder: str, dtype_name: str) -> None:
    dtype = getattr(torch, dtype_name)
    if kind == "transformers":
        import transformers

        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        import stratos_lite

        load = lambda: stratos_lite.load_model(folder, dtype=dtype)
    before = rss_bytes()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    with torch.no_grad():  # touch every weight, so lazily mapped pages count too
        total = sum(float(chunk.float().sum()) for p in model.parameters() for chunk in p.view(-1).split(1 << 20))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak": peak, "model_bytes": model_bytes, "checksum": total}))


def run(kind: str, folder: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--folder", str(folder), "--dtype", dtype],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=560e6)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/sl_load_bench"))
    parser.add_argument("--child", choices=["ours", "transformers"])
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if args.child:
        return child(args.child, str(args.folder), args.dtype)
    if not (args.folder / "config.json").is_file():
        write_checkpoint(args.folder, args.params)
    checkpoint = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    shards = len(list(args.folder.glob("*.safetensors")))
    print(f"checkpoint: {checkpoint / 1e9:.2f} GB bf16 in {shards} shards")
    print(f"{'case':<22}{'loader':<14}{'seconds':>9}{'peak GB':>9}{'x output':>10}")
    for dtype in ("bfloat16", "float32"):
        results = {kind: run(kind, args.folder, dtype) for kind in ("transformers", "ours")}
        assert results["ours"]["checksum"] == results["transformers"]["checksum"], "loaders disagree"
        for kind, r in results.items():
            print(f"{'bf16 -> ' + dtype:<22}{kind:<14}{r['seconds']:>9.2f}{r['peak'] / 1e9:>9.2f}"
                  f"{r['peak'] / r['model_bytes']:>10.2f}")
        print(f"{'':<22}{'ratio ours/hf':<14}{results['ours']['seconds'] / results['transformers']['seconds']:>9.2f}"
              f"{results['ours']['peak'] / results['transformers']['peak']:>9.2f}")


if __name__ == "__main__":
    main()
