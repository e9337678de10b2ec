"""What one forward of a training step takes: a Batch, and where its loss is taken (LossPositions).

A batch is either a padded micro-batch (data items right-padded into rows, an example a row: `collate`) or a
packed row (whole examples laid end to end: packing.collate_packed). Where the loss is taken (the positions
whose next token is a completion token, those tokens, the example each belongs to and each example's count)
is read from the labels on the CPU when a step lays out its batches, so that a step on a GPU never waits for
the device to learn it: boolean indexing and nonzero on a device tensor each stop the host until the GPU has
caught up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.attention import Segments

IGNORE_INDEX = -100  # a label with no loss (the prompt, padding), as PyTorch's cross-entropy ignores it


@dataclass(frozen=True)
class LossPositions:
    """The positions a batch's loss reads, flat (row-major into rows x tokens), found on the CPU."""
    positions: torch.Tensor  # positions whose next token is a completion token: the only ones given logits
    targets: torch.Tensor  # that next token of each
    examples: torch.Tensor  # the example each belongs to
    counts: torch.Tensor  # completion tokens of each example

    def to(self, device: torch.device, non_blocking: bool = False) -> LossPositions:
        return LossPositions(*(_moved(t, device, non_blocking) for t in dataclasses.astuple(self)))


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (rows, tokens)
    labels: torch.Tensor  # (rows, tokens), IGNORE_INDEX where there is no loss
    weight: torch.Tensor  # (examples,) each example's loss weight, fp32
    lengths: torch.Tensor  # real tokens of each row (read on the CPU, for the step's token count)
    position_ids: torch.Tensor | None = None  # packed: positions restarting at 0 for each example
    segments: Segments | None = None  # packed: the examples' lengths (attention stays inside each)
    example_of: torch.Tensor | None = None  # packed: (1, tokens) the example each position belongs to
    loss: LossPositions | None = None  # where the loss is taken (with_loss_positions)

    def with_loss_positions(self) -> Batch:
        """This batch with its loss positions, found where its labels are (on the CPU, before the copy)."""
        return dataclasses.replace(self, loss=loss_positions(self))

    def to(self, device: torch.device, pinned: bool = False) -> Batch:
        """The tensors the forward and the loss read, on `device`; `pinned`: through page-locked memory, so
        the copy to a GPU does not wait for it. `lengths` stays where it is (the CPU)."""
        moved = {name: _moved(value, device, pinned) for name, value in self._tensors().items()}
        loss = self.loss.to(device, pinned) if self.loss is not None else None
        return dataclasses.replace(self, **moved, loss=loss)

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("input_ids", "labels", "weight", "position_ids", "example_of")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _moved(tensor: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    return (tensor.pin_memory() if pinned else tensor).to(device, non_blocking=pinned)


def collate(items: Sequence[dict], pad_id: int) -> Batch:
    """Right-pad a micro-batch: input_ids (pad_id), labels (-100), per-example weights and true lengths."""
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        labels[row, : len(item["labels"])] = item["labels"]
    weights = torch.tensor([float(item["weight"]) for item in items], dtype=torch.float32)
    lengths = torch.tensor([len(item["input_ids"]) for item in items], dtype=torch.long)
    return Batch(ids, labels, weights, lengths)


def loss_positions(batch: Batch) -> LossPositions:
    """For a padded batch (an example a row) or a packed row (whose `example_of` names each position's
    example): the flat positions that get logits, their target tokens, the example of each, and how many each
    example has."""
    targets = batch.labels[:, 1:]
    select = torch.zeros_like(batch.labels, dtype=torch.bool)
    select[:, :-1] = targets != IGNORE_INDEX
    examples = batch.example_of[select] if batch.example_of is not None else select.nonzero()[:, 0]
    return LossPositions(select.flatten().nonzero()[:, 0], targets[targets != IGNORE_INDEX], examples,
                         torch.bincount(examples, minlength=len(batch.weight)))
