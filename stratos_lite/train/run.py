"""A training run from a TrainConfig alone: its model prepared by the builder (builder.py), trained on the data
read for it.

What `stratos-lite train` runs; a script that builds its own model and data uses Trainer directly instead.
"""

from __future__ import annotations

from ..config import TrainConfig
from ..data.dataset import RunData
from .builder import prepare_model
from .trainer import Trainer, TrainResult


def train_from_config(config: TrainConfig, data: RunData) -> TrainResult:
    """Prepare the model `config` trains and train it on `data` (RunData.read(config), read once: the train
    command's plan reads its lengths first)."""
    return Trainer(prepare_model(config), data.train, config, eval_dataset=data.evaluation,
                   pad_id=data.tokenizer.pad_id).train()
