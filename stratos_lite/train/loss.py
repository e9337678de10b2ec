"""The training loss: each example's mean token cross-entropy over its completion.

    per-example loss = mean over its completion tokens of -log p(token)

The positions it reads come with the batch (data/batch.py: found on the CPU, so a GPU step never waits to
learn them); only those positions go through the vocabulary projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.batch import Batch, loss_positions


def example_losses(model: Callable[..., torch.Tensor], batch: Batch, loss_chunk: int = 0) -> torch.Tensor:
    """Mean token cross-entropy over each example's completion, one value per example of the batch.

    Only completion positions go through the vocabulary projection (most of a prompt never needs logits), and
    `loss_chunk` of them at a time (TrainConfig.loss_chunk; 0: all at once). A batch without its loss
    positions has them found here, on its own device."""
    where = batch.loss or loss_positions(batch)
    token_losses = model(batch.input_ids, logits_at=where.positions, targets=where.targets, loss_chunk=loss_chunk,
                         position_ids=batch.position_ids, attention_mask=batch.segments)
    if torch.are_deterministic_algorithms_enabled():  # TrainConfig.deterministic: no atomic adds on a GPU
        sums = torch.segment_reduce(token_losses, "sum", lengths=where.counts, unsafe=True)
    else:
        sums = torch.zeros(len(where.counts), device=token_losses.device).index_add(0, where.examples, token_losses)
    return sums / where.counts.clamp_min(1)
