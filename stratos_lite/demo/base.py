"""The demo's profile-blind base: trained in the run, or made once and shipped with the package.

Before the DoRA phase can teach the demo's scorer to use a reader's profile, a base trained from scratch
must learn to read one: which country a code names, whether a field is the article's sector. On a 2-core
CPU that took most of the demo's minutes and, at that budget, came out well for some seeds and not others.
So the base is made once, by `python tools/make_demo_base.py`: demo.toml's base phase on
its seed's data, in float32 so that any CPU repeats it. The folder it writes, stratos_lite/demo/shipped_base/,
holds the weights (bf16), the tokenizer and made_by.json: the settings, the losses of the warmup steps
(tests/test_demo_base.py trains the first of them again and compares) and how well the base reads held-out
profiles.
The demo loads it and spends its minutes on the V2 phase, whatever its seed; `vendored_base = false`
trains the base in the run instead.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.dataset import ScoredDataset
from ..evaluation.engines import TorchEngine
from ..evaluation.predictions import load_eval_records, predict
from ..model.folders import load_pretrained, save_pretrained
from ..model.qwen3 import Qwen3Config, Qwen3ForCausalLM
from ..model.tokenizer import Tokenizer
from ..storage.atomic import write_text
from ..train.trainer import Trainer, TrainResult
from .config import DemoConfig, phase_config
from .data import make_demo_data

VENDORED_BASE = Path(__file__).with_name("shipped_base")
RECORD = "made_by.json"
VENDORED_DTYPE = torch.bfloat16  # half the bytes of float32 in the repository; the DoRA phase computes in bf16
# What each of the reasoning's three verdicts says; a base that reads profiles writes the true one.
VERDICTS = {"sector": r"Article sector .+? (matches|differs)\.", "topic": r"Article topic .+? (listed|unlisted)\.",
            "country": r"Article country .+? (same|elsewhere)\."}


BASE_DATA = ("base_articles", "profiles_per_article", "vocab_size")  # the [data] settings a base depends on


def base_settings(config: DemoConfig) -> dict:
    """What the base depends on: its seed, its data (and tokenizer), model shape and phase settings."""
    return {"seed": config.seed, "data": {key: config.data[key] for key in BASE_DATA}, "model": config.model,
            "base": config.base}


def train_base(config: DemoConfig, paths: dict[str, Path], tokenizer: Tokenizer,
               **changes) -> tuple[Qwen3ForCausalLM, TrainResult]:
    """The base phase: a random Qwen3 of the demo's shape trained in full on base.jsonl's profile-blind
    labels (the report's V1). `changes` go to the phase's TrainConfig (out_dir, dtype, max_steps...)."""
    base_config = phase_config(config, "base", **changes)
    data = ScoredDataset.from_jsonl(paths["base"], tokenizer, max_len=base_config.max_len)
    torch.manual_seed(config.seed)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=tokenizer.vocab_size, **config.model))
    print(f"base phase: full fine-tuning of a {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M-parameter "
          "Qwen3 on profile-blind labels (the report's V1)")
    return model, Trainer(model, data, base_config, pad_id=tokenizer.pad_id).train()


def warmup_steps(config: DemoConfig, total_steps: int) -> int:
    """How many of a base phase's `total_steps` warm up (their losses are recorded with the shipped base)."""
    return math.ceil(phase_config(config, "base").warmup_ratio * total_steps)


def step_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def verdict_errors(truth: Sequence[str], written: Sequence[str]) -> dict[str, int]:
    """Per kind, how many verdicts of `written` (completions) disagree with `truth` (the true reasoning of
    the same records); a verdict not written counts as an error."""
    errors = dict.fromkeys(VERDICTS, 0)
    for expected_text, text in zip(truth, written, strict=True):
        for kind, pattern in VERDICTS.items():
            expected, found = re.search(pattern, expected_text), re.search(pattern, text)
            errors[kind] += found is None or found.group(1) != expected.group(1)
    return errors


def reading_quality(model, tokenizer: Tokenizer, eval_path: Path, limit: int = 0) -> dict:
    """How well `model` reads held-out profiles: its greedy completions' verdict errors per kind and the
    completions whose score could not be read, over the first `limit` records of an eval JSONL (0: all)."""
    records = load_eval_records(eval_path, limit)
    predictions, _ = predict(TorchEngine(model, tokenizer.pad_id, batch_size=64), tokenizer, records,
                             max_new_tokens=96, progress=False)
    return {"records": len(records),
            "verdict_errors": verdict_errors([r.completion for r in records], [p.raw for p in predictions]),
            "parse_failures": sum(p.status != "ok" for p in predictions)}


def make_vendored_base(config: DemoConfig, work: Path, dest: Path = VENDORED_BASE) -> dict:
    """Train the base as the demo would (in float32, under `work`), measure how it reads held-out profiles,
    and write it with its tokenizer and record to `dest`; returns the record."""
    paths = make_demo_data(work / "data", seed=config.seed, **config.data)
    tokenizer = Tokenizer.from_pretrained(paths["tokenizer"])
    start = time.perf_counter()
    model, result = train_base(config, paths, tokenizer, out_dir=str(work / "base"), dtype="float32")
    seconds = time.perf_counter() - start
    model.to(VENDORED_DTYPE).eval()  # measured as shipped
    record = {"made_by": "python tools/make_demo_base.py", "settings": base_settings(config), "dtype": "float32",
              "steps": result.steps, "final_loss": result.final_loss, "seconds": round(seconds, 1),
              "warmup_losses": step_losses(work / "base")[:warmup_steps(config, result.steps)],
              "held_out": reading_quality(model, tokenizer, paths["eval"]),
              "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "made": time.strftime("%Y-%m-%d")}
    save_pretrained(model, tokenizer, dest, dtype=VENDORED_DTYPE)
    write_text(dest / RECORD, json.dumps(record, indent=2) + "\n")
    return record


def vendored_record(folder: Path = VENDORED_BASE) -> dict:
    return json.loads((folder / RECORD).read_text())


def check_vendored_settings(config: DemoConfig, record: dict) -> None:
    """Refuse a demo whose model shape, vocabulary or base phase differs from the vendored base's: its
    weights could not serve them. One line naming the setting and the way out."""
    made = record["settings"]
    asked = {"model": config.model, "data": {"vocab_size": config.data["vocab_size"]}, "base": config.base}
    for section, values in asked.items():
        for key, value in values.items():
            if made[section].get(key) != value:
                raise ValueError(f"demo setting [{section}] {key} = {value!r} differs from the vendored base's "
                                 f"({made[section].get(key)!r}, {VENDORED_BASE / RECORD}); set vendored_base = "
                                 "false to train a base with it in the run, or remake the base "
                                 "(python tools/make_demo_base.py)")


def load_vendored_base(config: DemoConfig, folder: Path = VENDORED_BASE) -> tuple[Qwen3ForCausalLM, Tokenizer]:
    """The shipped base in float32 (the DoRA phase casts it to its compute dtype) and its tokenizer, after
    checking that the demo's settings are those it was made with."""
    check_vendored_settings(config, vendored_record(folder))
    return load_pretrained(folder, dtype=torch.float32)
