"""Packing: a step's examples laid out as rows of up to `pack_tokens` tokens instead of padded micro-batches.

Packing changes the layout of a step, never its math. The step draws exactly the examples it draws unpacked
(same sampler, same order); they are placed whole into rows by first-fit decreasing; each row is one
forward and backward. Inside a row every example keeps to itself:

    attention   causal within each example only (model.Segments: one attention call per example, so a row
                pays the sum of its examples' T^2, not the row's, and flash kernels still apply)
    positions   restart at 0 for each example (RoPE sees what it sees unpacked)
    targets     an example's first token is never a target, so no position is trained to predict a token
                of the next example
    loss        per-example mean over its completion tokens, weighted, over the step's one denominator

so an example's logits equal its unpacked logits, and a packed step's gradient equals the unpacked step's up
to summation order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..model.attention import Segments
from .batch import IGNORE_INDEX, Batch


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose lengths sum to at most `capacity`: longest first, each
    into the first row with room (within 11/9 of the fewest rows possible, plus one). Rows keep their
    examples in draw order, so a row's layout does not depend on how ties were broken."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[index] > capacity:
            raise ValueError(f"an example of {lengths[index]} tokens does not fit a row of {capacity}")
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return [sorted(row) for row in rows]


def collate_packed(items: Sequence[dict]) -> Batch:
    """One packed row of whole examples: input_ids and labels (1, T), position_ids restarting per example,
    `segments` (model.Segments), `example_of` (1, T) naming each position's example, per-example weights and
    the row's true length."""
    input_ids = torch.cat([item["input_ids"] for item in items])[None]
    labels = torch.cat([_first_token_unlabelled(item["labels"]) for item in items])[None]
    lengths = [len(item["input_ids"]) for item in items]
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    example_of = torch.cat([torch.full((length,), index) for index, length in enumerate(lengths)])[None]
    weights = torch.tensor([float(item["weight"]) for item in items], dtype=torch.float32)
    return Batch(input_ids, labels, weights, torch.tensor([sum(lengths)]), position_ids=positions,
                 segments=Segments(tuple(lengths)), example_of=example_of)


def _first_token_unlabelled(labels: torch.Tensor) -> torch.Tensor:
    """An example's first token has no earlier position to predict it; unlabelled, it cannot become the
    target of the previous example's last position."""
    labels = labels.clone()
    labels[0] = IGNORE_INDEX
    return labels


def filler_row(pad_id: int) -> Batch:
    """A two-token row with no example: what a rank whose examples packed into fewer rows runs, so that
    every rank joins the same number of forwards and backwards (FSDP gathers parameters in each)."""
    row = collate_packed([{"input_ids": torch.full((2,), pad_id), "labels": torch.full((2,), IGNORE_INDEX),
                           "weight": 0.0}])
    return replace(row, weight=torch.zeros(0), example_of=torch.full((1, 2), -1), lengths=torch.tensor([0]))


def pack_step(items: Sequence[dict], capacity: int) -> list[Batch]:
    """A step's drawn examples as packed rows (collate_packed), by first-fit decreasing."""
    rows = first_fit_decreasing([len(item["input_ids"]) for item in items], capacity)
    return [collate_packed([items[i] for i in row]) for row in rows]


@dataclass(frozen=True)
class PaddingEstimate:
    """What packing would change on a data set, from its real lengths: drawn uniformly, `steps` optimizer
    steps of batch_size x grad_accum examples, padded (each micro-batch to its longest example) and packed
    (first-fit decreasing into rows of `row_tokens`, which carry no padding)."""
    real_tokens: int
    padded_tokens: int
    micro_batches_per_step: int
    rows_per_step: float
    row_tokens: int

    @property
    def padding_share(self) -> float:
        """The share of an unpacked step's computed tokens that are padding."""
        return 1 - self.real_tokens / self.padded_tokens

    @property
    def padding_bound(self) -> float:
        """Padded tokens / real tokens: the most removing the padding can speed a step up by."""
        return self.padded_tokens / self.real_tokens

    def describe(self) -> str:
        return (f"{100 * self.padding_share:.1f} % of an unpacked step's tokens are padding (bound "
                f"{self.padding_bound:.2f}x); packed: {self.rows_per_step:.1f} rows of up to {self.row_tokens:,} "
                f"tokens per step instead of {self.micro_batches_per_step} micro-batches, no padding")


def estimate_padding(lengths: Sequence[int], batch_size: int, grad_accum: int, row_tokens: int,
                     steps: int = 64, seed: int = 0) -> PaddingEstimate:
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(lengths), (steps, grad_accum, batch_size), generator=generator).tolist()
    real = padded = rows = 0
    for step in draws:
        step_lengths = [[lengths[i] for i in micro] for micro in step]
        real += sum(map(sum, step_lengths))
        padded += sum(max(micro) * len(micro) for micro in step_lengths)
        rows += len(first_fit_decreasing([n for micro in step_lengths for n in micro], row_tokens))
    return PaddingEstimate(real, padded, grad_accum, rows / steps, row_tokens)
