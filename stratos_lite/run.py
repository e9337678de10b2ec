"""A training run from a TrainConfig alone: load the model folder, wrap it, read the data, train; and the
plan's timed probe, which is such a run cut short.

What tools/train.py runs; a script that builds its own model and data uses Trainer directly instead.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .config import TrainConfig, compute_dtype, default_device
from .data import ScoredDataset
from .distributed import init_distributed, load_sharded
from .dora import apply_dora
from .packing import estimate_padding
from .plan import Plan
from .tokenizer import Tokenizer
from .trainer import Trainer, TrainResult
from .weights import load_model


def train_from_config(config: TrainConfig, quiet: bool = False, train: ScoredDataset | None = None) -> TrainResult:
    """Load, wrap and train as `config` says; `train` is config.train_data already read (by a plan)."""
    device = default_device()
    say = (lambda *_: None) if quiet else print
    # A frozen base is stored in the compute dtype; trained weights (mode "full") stay in fp32.
    dtype = compute_dtype(config.dtype, device) if config.mode == "dora" else torch.float32
    tokenizer = Tokenizer.from_pretrained(config.model)
    rank, world_size = init_distributed(device)  # before loading: a sharded load needs the process group
    if config.strategy == "fsdp" and world_size > 1:
        model = load_sharded(config.model, config, dtype, device)  # no rank ever holds the whole model
    else:
        model = load_model(config.model, dtype=dtype, device=device)
        if config.mode == "dora":
            say(apply_dora(model, config.rank, config.alpha, config.dropout, config.targets, seed=config.seed))
    if train is None:  # with the tokenizer already loaded above, not a second time
        train = ScoredDataset.from_jsonl(config.train_data, tokenizer, max_len=config.max_len)
    if rank == 0:
        train.report.write(config.out_dir)
    say(train.report.to_markdown())
    say("padding: " + estimate_padding(train.lengths, config.batch_size, config.grad_accum,
                                       max(config.row_tokens, max(train.lengths))).describe()
        + ("" if config.packing else " (packing = true would remove it)"))
    evaluation = (ScoredDataset.from_jsonl(config.eval_data, tokenizer, max_len=config.max_len)
                  if config.eval_data and config.eval_every else None)
    return Trainer(model, train, config, eval_dataset=evaluation, pad_id=tokenizer.pad_id).train()


def probe(config: TrainConfig, steps: int, result: Plan) -> Plan:
    """Run `steps` real optimizer steps (weights loaded, no checkpoint saved, in a temporary out_dir) and put
    the measured seconds per step into `result`: the median of the steps after the first, which warms up
    allocators and kernels."""
    with tempfile.TemporaryDirectory() as out_dir:
        probe_config = TrainConfig(**{**config.to_dict(), "out_dir": out_dir, "max_steps": steps,
                                      "save_every": 10**9, "verify_batches": 0, "eval_every": 0,
                                      "progress": False})
        train_from_config(probe_config, quiet=True)
        lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    times = sorted(json.loads(line)["step_seconds"] for line in lines[1:] or lines)
    result.seconds_per_step = times[len(times) // 2]
    result.probe_steps = len(times)
    return result
