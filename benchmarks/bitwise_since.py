"""Is training bitwise unchanged since REV? The same five tiny runs with the code at REV and with this checkout.

    python benchmarks/bitwise_since.py 6d61436 [--work /tmp/bitwise]

One tiny Qwen3 folder and the demo's data (24 articles) are made once; each run is `python -m stratos_lite
train --config ...` (`torchrun --nproc_per_node 2` for the two multi-rank ones), 6 steps with checkpoints at
3 and 6, in fp32 with the math attention kernel: DoRA with dropout 0.1 in one process, full fine-tuning, DDP
on 2 ranks with dropout, FSDP on 2 ranks, a packed run. Compared: each metrics.jsonl without its timing
fields, and every .safetensors written (adapters, trainable weights, optimizer and RNG states, the model),
by SHA-256. REV's code runs from a git worktree, put first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"dtype": "float32", "attention_kernel": "math", "batch_size": 2, "grad_accum": 2, "max_len": 512,
          "lr": 1e-3, "max_steps": 6, "save_every": 3, "progress": False, "seed": 0, "gradient_checkpointing": False}
RUNS = {"dora_dropout": {"dropout": 0.1}, "full": {"mode": "full"}, "ddp": {"dropout": 0.1},
        "fsdp": {"strategy": "fsdp"}, "packed": {"packing": True, "pack_tokens": 1024}}
RANKS = {"ddp": 2, "fsdp": 2}
TIMING = ("seconds", "_s")  # the endings of the fields that time a step (step_seconds, tokens_per_s, ...)
MACHINE = ("elapsed", "rss", "memory")  # and words of those that measure the machine, not the training


def make_inputs(work: Path) -> None:
    import torch

    import stratos_lite as sl
    from stratos_lite.demo.data import make_demo_data

    paths = make_demo_data(work / "data", seed=0, train_articles=24, eval_articles=4, vocab_size=600)
    tokenizer = sl.Tokenizer.from_pretrained(paths["tokenizer"])
    config = sl.Qwen3Config.from_dict(dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=tokenizer.vocab_size, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=False))
    torch.manual_seed(0)
    model = sl.Qwen3ForCausalLM(config)
    model.initialize_weights()
    sl.save_pretrained(model, tokenizer, work / "model", dtype=torch.float32)


def toml(settings: dict) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


def train_all(code: Path, work: Path, out: Path) -> None:
    """The five runs with the stratos_lite found in `code`, into out/NAME."""
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    for name, changes in RUNS.items():
        config = out / f"{name}.toml"
        config.write_text(toml({"model": str(work / "model"), "train_data": str(work / "data" / "train.jsonl"),
                                "out_dir": str(out / name), **COMMON, **changes}))
        launcher = (["torchrun", "--nproc_per_node", str(RANKS[name])] if name in RANKS else [sys.executable])
        subprocess.run([*launcher, "-m", "stratos_lite", "train", "--config", str(config)], env=env, check=True,
                       capture_output=True, cwd=work)
        print(f"{out.name}: {name} done")


def digests(out: Path) -> dict[str, str]:
    found = {}
    for metrics in sorted(out.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rows = [{k: v for k, v in row.items() if not (k.endswith(TIMING) or any(w in k for w in MACHINE))}
                for row in rows]
        found[str(metrics.relative_to(out))] = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    for tensors in sorted(out.rglob("*.safetensors")):
        found[str(tensors.relative_to(out))] = hashlib.sha256(tensors.read_bytes()).hexdigest()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the commit to compare with (e.g. 6d61436, before the house)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bitwise"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    make_inputs(args.work)
    old_code = args.work / "code-before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old_code), args.rev], check=True)
    try:
        train_all(old_code, args.work, args.work / "before")
        train_all(ROOT, args.work, args.work / "after")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_code)], check=True)
    before, after = digests(args.work / "before"), digests(args.work / "after")
    same = [name for name in before if after.get(name) == before[name]]
    print(f"{len(before)} files before, {len(after)} after, {len(same)} with identical SHA-256")
    for name in sorted((set(before) | set(after)) - set(same)):
        print(f"differs: {name}")
    sys.exit(0 if len(same) == len(before) == len(after) else 1)


if __name__ == "__main__":
    main()
