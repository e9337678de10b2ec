"""The training loss, each example's mean token cross-entropy over its completion, and where it is taken.

Where (the positions whose next token is a completion token, those tokens, the example each belongs to and
each example's count) is read from the labels on the CPU when a step lays out its batches
(`with_loss_positions`), so that a step on a GPU never waits for the device to learn it: boolean indexing
and nonzero on a device tensor each stop the host until the GPU has caught up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def loss_positions(batch: dict) -> dict[str, torch.Tensor]:
    """For a padded batch (data.collate: an example a row) or a packed row (packing.collate_packed, whose
    `example_of` names each position's example): the flat (row-major) positions that get logits, their
    target tokens, the example of each, and how many each example has."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = targets != IGNORE_INDEX
    examples = batch["example_of"][select] if "example_of" in batch else select.nonzero()[:, 0]
    return {"loss_positions": select.flatten().nonzero()[:, 0], "loss_targets": targets[targets != IGNORE_INDEX],
            "loss_examples": examples, "loss_counts": torch.bincount(examples, minlength=len(batch["weight"]))}


def with_loss_positions(batch: dict) -> dict:
    """The batch with its loss positions added (computed where its labels are: on the CPU, before the copy)."""
    return {**batch, **loss_positions(batch)}


def example_losses(model: Callable[..., torch.Tensor], batch: dict) -> torch.Tensor:
    """Mean token cross-entropy over each example's completion, one value per example of the batch.

    Only completion positions go through the vocabulary projection (most of a prompt never needs logits).
    A batch without its loss positions has them found here, on its own device."""
    where = batch if "loss_positions" in batch else loss_positions(batch)
    logits = model(batch["input_ids"], logits_at=where["loss_positions"], position_ids=batch.get("position_ids"),
                   attention_mask=batch.get("segments"))
    token_losses = F.cross_entropy(logits.float(), where["loss_targets"], reduction="none")
    counts = where["loss_counts"]
    if torch.are_deterministic_algorithms_enabled():  # TrainConfig.deterministic: no atomic adds on a GPU
        sums = torch.segment_reduce(token_losses, "sum", lengths=counts, unsafe=True)
    else:
        sums = torch.zeros(len(counts), device=token_losses.device).index_add(0, where["loss_examples"], token_losses)
    return sums / counts.clamp_min(1)
