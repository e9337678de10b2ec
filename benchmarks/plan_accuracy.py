"""The plan's predicted peak against the measured one, setting by setting.

    python benchmarks/plan_accuracy.py                 # the settings below, on this machine
    python benchmarks/plan_accuracy.py --only 0 2      # some of them

Each setting trains for two optimizer steps in a fresh interpreter (random weights built in place, synthetic
examples whose last quarter is completion) and reports its peak: on the CPU the growth of peak RSS over the
RSS before the model was built, with each TrainConfig.heap_release: "off" (the default: glibc keeps freed
blocks resident), "steps" (freed pages handed back at micro-batch and step boundaries) and "layers" (also
every 4 decoder layers); on a GPU torch.cuda.max_memory_allocated. The plan is made in this process
from the same settings (sl.plan with the model's config and the data's shape, nothing loaded).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from step_speed import examples

import stratos_lite as sl
from stratos_lite.planning.report import DataShape

SHAPES = {
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
# (shape, TrainConfig settings, sequence length)
SETTINGS = [
    ("qwen3-0.6b", dict(mode="dora", dtype="bfloat16", batch_size=1, grad_accum=2, checkpoint_policy="layer"), 512),
    ("qwen3-0.6b", dict(mode="dora", dtype="bfloat16", batch_size=2, grad_accum=2, checkpoint_policy="layer"), 1024),
    ("qwen3-0.6b", dict(mode="dora", dtype="bfloat16", batch_size=1, grad_accum=2, checkpoint_policy="mlp"), 512),
    ("qwen3-0.6b", dict(mode="dora", dtype="bfloat16", batch_size=1, grad_accum=1, gradient_checkpointing=False), 256),
    ("small", dict(mode="full", dtype="float32", batch_size=4, grad_accum=2, checkpoint_policy="layer"), 256),
]
STEPS = 2


def train_config(settings: dict, seq: int, out_dir: str = "unused", heap_release: str = "off") -> sl.TrainConfig:
    return sl.TrainConfig(out_dir=out_dir, max_len=seq, max_steps=STEPS, band_sampling=False, verify_batches=0,
                          save_every=10**9, progress=False, lr=1e-5, heap_release=heap_release, **settings)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def train(shape: dict, settings: dict, seq: int, device: torch.device, heap_release: str) -> float:
    """Trains; returns the seconds of the last step (the first pays for warming up)."""
    config = train_config(settings, seq, heap_release=heap_release)
    weights_dtype = sl.compute_dtype(config.dtype, device) if config.mode == "dora" else torch.float32
    torch.set_default_dtype(weights_dtype)  # filled in place in its dtype, as loading a folder leaves it
    with torch.device("meta"):
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config(**shape))
    torch.set_default_dtype(torch.float32)
    model.to_empty(device=device).tie_weights()
    model.initialize_weights()
    if config.mode == "dora":
        sl.apply_dora(model, config.rank, config.alpha, config.dropout, config.targets)
    else:
        model.requires_grad_(True)
    with tempfile.TemporaryDirectory() as out_dir:
        config.out_dir = out_dir
        sl.Trainer(model, examples(shape["vocab_size"], seq, 16, completion=seq // 4), config).train()
        last = (Path(out_dir) / "metrics.jsonl").read_text().strip().splitlines()[-1]
    return json.loads(last)["step_seconds"]


def measure(index: int, heap_release: str) -> tuple[int, float]:
    """Peak memory of one setting's run, and its last step's seconds. A tiny run of the same kind goes first,
    so that the growth counts the run's memory and not the library code its first steps page in (a fixed
    few hundred MB of RSS)."""
    shape, settings, seq = SETTINGS[index]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train(SHAPES["tiny"], settings, 32, device, heap_release)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = rss()
    seconds = train(SHAPES[shape], settings, seq, device, heap_release)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(), seconds
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, seconds


def predict(index: int) -> sl.Plan:
    shape, settings, seq = SETTINGS[index]
    data = DataShape(examples=16, longest=seq, longest_completion=seq // 4, mean_tokens=seq, source="synthetic")
    return sl.plan(train_config(settings, seq), model_config=sl.Qwen3Config(**SHAPES[shape]), data=data)


def describe(index: int) -> str:
    shape, settings, seq = SETTINGS[index]
    policy = settings.get("checkpoint_policy", "layer") if settings.get("gradient_checkpointing", True) else "off"
    return (f"{shape}, {settings['mode']}, {settings['dtype']}, batch {settings['batch_size']} x {seq}, "
            f"accum {settings['grad_accum']}, checkpointing {policy}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=int, nargs="+", help="indices of SETTINGS to run")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--heap-release", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        peak, seconds = measure(args.child, args.heap_release)
        print(json.dumps({"peak": peak, "step_seconds": seconds}))
        return
    on_gpu = torch.cuda.is_available()
    modes = ["off"] if on_gpu else ["off", "steps", "layers"]  # heap_release acts on the CPU only
    print(f"{'GPU (max_memory_allocated)' if on_gpu else 'CPU (peak RSS growth)'}; torch {torch.__version__}; "
          f"{STEPS} optimizer steps per setting")
    print("| setting | predicted GB | " + " | ".join(f"measured GB, heap_release {m} | error | s/step" for m in modes)
          + " |")
    print("|---|---|" + "---|---|---|" * len(modes))
    for index in args.only if args.only is not None else range(len(SETTINGS)):
        predicted = predict(index).peak
        cells = [f"{predicted / 1e9:.2f}"]
        for mode in modes:
            measured, seconds = run_child(index, mode)
            cells += [f"{measured / 1e9:.2f}", f"{100 * (predicted - measured) / measured:+.1f} %", f"{seconds:.2f}"]
        print(f"| {describe(index)} | " + " | ".join(cells) + " |", flush=True)


def run_child(index: int, heap_release: str) -> tuple[int, float]:
    """One setting's measured peak and last step's seconds, in a fresh interpreter."""
    out = subprocess.run([sys.executable, __file__, "--child", str(index), "--heap-release", heap_release],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["peak"], result["step_seconds"]


if __name__ == "__main__":
    main()
