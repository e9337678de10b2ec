"""What TrainConfig.heap_release costs on short steps: the demo's base phase (stratos_lite/demo.toml: its small
Qwen3, its data, full fine-tuning, batch 8, dtype "auto") through the Trainer with heap_release "off",
"steps" and "layers".

    python benchmarks/heap_release_speed.py [--steps 100] [--rounds 2]

Each round runs every setting once in turn (fresh model, same seed); the figure is the median step time
over all rounds, the first step of each run left out. benchmarks/plan_accuracy.py gives the long-step side
(Qwen3-0.6B's shape) and the memory each setting saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch
from dtype_speed import demo_base_phase

import stratos_lite as sl
from stratos_lite.demo.config import phase_config

SETTINGS = ("off", "steps", "layers")


def step_seconds(demo, tokenizer, data, heap_release: str, steps: int) -> list[float]:
    """The step times of one run of `steps` base-phase steps, the first left out."""
    with tempfile.TemporaryDirectory() as out_dir:
        demo.out_dir = out_dir
        demo.base = {**demo.base, "max_steps": steps, "save_every": 10**9, "progress": False,
                     "heap_release": heap_release}
        torch.manual_seed(demo.seed)
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config(vocab_size=tokenizer.vocab_size, **demo.model))
        with redirect_stdout(StringIO()):  # the Trainer's summary
            sl.Trainer(model, data, phase_config(demo, "base"), pad_id=tokenizer.pad_id).train()
        lines = (Path(out_dir) / "base" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step_seconds"] for line in lines[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    demo, tokenizer, data = demo_base_phase()
    times: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            times[setting] += step_seconds(demo, tokenizer, data, setting, args.steps)
    print(f"demo base phase, {args.steps} steps x {args.rounds} rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    off = statistics.median(times["off"])
    for setting in SETTINGS:
        median = statistics.median(times[setting])
        print(f"heap_release {setting:>6}: {median:.4f} s/step ({median / off:.2f}x off)")


if __name__ == "__main__":
    main()
