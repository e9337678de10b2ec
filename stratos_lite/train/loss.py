"""The training loss: each example's mean token cross-entropy over its completion.

    per-example loss = mean over its completion tokens of -log p(token)

The positions it reads come with the batch (data/batch.py: found on the CPU, so a GPU step never waits to
learn them); only those positions go through the vocabulary projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..data.batch import Batch, loss_positions


def example_losses(model: Callable[..., torch.Tensor], batch: Batch) -> torch.Tensor:
    """Mean token cross-entropy over each example's completion, one value per example of the batch.

    Only completion positions go through the vocabulary projection (most of a prompt never needs logits).
    A batch without its loss positions has them found here, on its own device."""
    where = batch.loss or loss_positions(batch)
    logits = model(batch.input_ids, logits_at=where.positions, position_ids=batch.position_ids,
                   attention_mask=batch.segments)
    token_losses = F.cross_entropy(logits.float(), where.targets, reduction="none")
    if torch.are_deterministic_algorithms_enabled():  # TrainConfig.deterministic: no atomic adds on a GPU
        sums = torch.segment_reduce(token_losses, "sum", lengths=where.counts, unsafe=True)
    else:
        sums = torch.zeros(len(where.counts), device=token_losses.device).index_add(0, where.examples, token_losses)
    return sums / where.counts.clamp_min(1)
