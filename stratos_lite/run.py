"""A training run from a TrainConfig alone: load the model folder, wrap it, read the data, train.

What tools/train.py runs, and what a plan's probe times; a script that builds its own model and data uses
Trainer directly instead.
"""

from __future__ import annotations

import os

import torch

from .data import ScoredDataset
from .distributed import init_distributed, load_sharded
from .dora import apply_dora
from .tokenizer import Tokenizer
from .trainer import TrainConfig, Trainer, TrainResult, compute_dtype
from .weights import load_model


def default_device() -> torch.device:
    """This process's GPU when there is one (ROCm builds answer to "cuda" too), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def read_training_data(config: TrainConfig) -> ScoredDataset:
    """config.train_data tokenized with the model folder's tokenizer (no weights read)."""
    return ScoredDataset.from_jsonl(config.train_data, Tokenizer.from_pretrained(config.model), max_len=config.max_len)


def train_from_config(config: TrainConfig, quiet: bool = False, train: ScoredDataset | None = None) -> TrainResult:
    """Load, wrap and train as `config` says; `train` is config.train_data already read (by a plan)."""
    device = default_device()
    say = (lambda *_: None) if quiet else print
    # A frozen base is stored in the compute dtype; trained weights (mode "full") stay in fp32.
    dtype = compute_dtype(config.dtype, device) if config.mode == "dora" else torch.float32
    tokenizer = Tokenizer.from_pretrained(config.model)
    _, world_size = init_distributed()  # before loading: a sharded load needs the process group
    if config.strategy == "fsdp" and world_size > 1:
        model = load_sharded(config.model, config, dtype, device)  # no rank ever holds the whole model
    else:
        model = load_model(config.model, dtype=dtype, device=device)
        if config.mode == "dora":
            say(apply_dora(model, config.rank, config.alpha, config.dropout, config.targets, seed=config.seed))
    if train is None:
        train = ScoredDataset.from_jsonl(config.train_data, tokenizer, max_len=config.max_len)
    train.report.write(config.out_dir)
    say(train.report.to_markdown())
    evaluation = (ScoredDataset.from_jsonl(config.eval_data, tokenizer, max_len=config.max_len)
                  if config.eval_data and config.eval_every else None)
    return Trainer(model, train, config, eval_dataset=evaluation, pad_id=tokenizer.pad_id).train()
