"""How long a run is and how its learning rate moves: optimizer steps from epochs (or max_steps), and the
cosine schedule with linear warmup (transformers' get_cosine_schedule_with_warmup, which the tests hold it to)."""

from __future__ import annotations

import math

from ..config import TrainConfig


def optimizer_steps(config: TrainConfig, examples: int, world_size: int = 1) -> int:
    """How many optimizer steps a run of `config` over `examples` takes: max_steps when set, else its epochs
    at batch_size x grad_accum x world_size examples per step."""
    if config.max_steps > 0:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum * world_size
    return max(1, math.ceil(config.epochs * examples / per_step))


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup from 0 over `warmup` steps, then half a cosine down to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
