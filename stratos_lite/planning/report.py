"""The plan as a record and as text: what each part of a rank's memory takes, whether it fits, the largest
batch or row that would, and the time a probe measured (planner.py makes it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from ..data.batch import IGNORE_INDEX
from ..data.dataset import ScoredDataset
from ..data.packing import PaddingEstimate

GB = 1e9


class PlanError(ValueError):
    """The run does not fit the device; the message holds the plan and what to change."""


@dataclass(frozen=True)
class Packing:
    """The plan of a packed run: rows of `row_tokens` (the micro-batch simulated)."""
    row_tokens: int
    estimate: PaddingEstimate | None  # rows per step from the data's real lengths (None: data not read)



@dataclass
class DataShape:
    """What the plan needs from the training data: its size and its longest sequence and completion."""
    examples: int
    longest: int
    longest_completion: int
    mean_tokens: float
    source: str
    lengths: list[int] = field(default_factory=list)  # each example's tokens (what packing lays out)
    completion_share: float = 1.0  # the largest share of an example's tokens that are completion

    @classmethod
    def of(cls, dataset: ScoredDataset) -> DataShape:
        lengths = [len(e.input_ids) for e in dataset.examples]
        completions = [int((e.labels != IGNORE_INDEX).sum()) for e in dataset.examples]
        return cls(len(lengths), max(lengths), max(completions), sum(lengths) / len(lengths), dataset.report.source,
                   lengths, max(c / n for c, n in zip(completions, lengths, strict=True)))


class Alternatives:
    """Runs other than the planned one: the largest micro-batch and the longest packed row that fit, and the
    activations with checkpointing off. Each is found by simulating more micro-batches (a forward and backward
    on fake tensors each, seconds apiece at a real model's size), so each is worked out when first read (the
    plan printed, or the advice for a run that does not fit), never by a run that only checks that it fits."""

    def __init__(self, max_batch_size: Callable[[], int], max_row_tokens: Callable[[], int],
                 activations_no_checkpointing: Callable[[], int]):
        self._search_batch, self._search_row = max_batch_size, max_row_tokens
        self._simulate_unchecked = activations_no_checkpointing

    @cached_property
    def max_batch_size(self) -> int:
        return self._search_batch()

    @cached_property
    def max_row_tokens(self) -> int:
        return self._search_row()

    @cached_property
    def activations_no_checkpointing(self) -> int:
        return self._simulate_unchecked()


@dataclass
class Plan:
    """Memory and time of a training run per rank, predicted before loading (see the module docstring)."""
    model: str
    mode: str
    dtype: str
    device: str
    batch_size: int
    seq: int
    completions: int
    grad_accum: int
    world_size: int
    checkpointing: str
    params_base: int  # the model's own parameters (DoRA's are counted in params_trainable only)
    params_trainable: int
    weights: int
    base_quant: str  # TrainConfig.base_quant: "nf4" holds the target linears' frozen weights in 4 bits
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int  # what the loss holds for the backward beyond the activations
    loss_chunk: int  # TrainConfig.loss_chunk: completion positions projected onto the vocabulary at a time
    recompute_peak: int
    vocabulary_peak: int
    peak: int
    reserved: int  # what PyTorch's caching allocator would hold on a GPU at that peak (allocator.py)
    workspace: int  # the BLAS workspaces on this GPU (0 elsewhere)
    memory: int
    memory_source: str
    alternatives: Alternatives  # the largest batch and row that fit, worked out when first read
    row_limit: int  # the longest row searched: the model's context length (or the run's own row, when longer)
    batch_tokens: int  # the sequence length max_batch_size was searched at
    host_activations: int = 0  # activations held in host memory (offload_activations), at the peak
    data: DataShape | None = None
    seconds_per_step: float | None = None
    probe_steps: int = 0
    total_steps: int = 0
    per_rank: dict[str, int] = field(default_factory=dict)  # predicted peak per rank by strategy (ranks > 1)
    heap_release: str = "off"  # TrainConfig.heap_release: whether CPU RSS is held near the live peak
    notes: list[str] = field(default_factory=list)
    packing: Packing | None = None  # with TrainConfig.packing: the rows (batch_size and seq are one row's)
    unpacked_padding: PaddingEstimate | None = None  # without packing, when the data was read

    @property
    def max_batch_size(self) -> int:
        """The largest micro-batch of the data's longest example (max_len when unread) that fits."""
        return self.alternatives.max_batch_size

    @property
    def max_row_tokens(self) -> int:
        """The longest packed row that fits, up to row_limit."""
        return self.alternatives.max_row_tokens

    @property
    def activations_no_checkpointing(self) -> int:
        """The activations the run's micro-batch would save with gradient checkpointing off."""
        return self.alternatives.activations_no_checkpointing

    def cpu_rss_note(self) -> str:
        """How peak RSS relates to the plan on a CPU, and why."""
        if self.heap_release == "layers":
            return ("with heap_release 'layers' freed pages go back to the OS every few decoder layers, so peak "
                    "RSS stays near this figure")
        return ("the peak counts live tensors (what a GPU allocator reports); on a CPU glibc's heap keeps freed "
                "blocks resident, so peak RSS runs above this figure; heap_release 'layers' holds it near it")

    @property
    def chunked(self) -> bool:
        return 0 < self.loss_chunk < self.completions

    @property
    def loss_held(self) -> str:
        return "each position's gradient, no logits" if self.chunked else "logits, fp32 copy, log-softmax"

    @property
    def loss_chunks(self) -> str:
        return f", {self.loss_chunk} positions at a time" if self.chunked else ", all positions at once"

    @property
    def batch_text(self) -> str:
        if self.packing:
            return f"batch {self.batch_size} packed in rows of up to {self.seq} tokens"
        return f"batch {self.batch_size} x {self.seq} tokens"

    @property
    def forward_shape(self) -> str:
        """One forward's shape: batch x tokens, or a packed row's tokens."""
        return f"1 x {self.seq} (a packed row)" if self.packing else f"{self.batch_size} x {self.seq}"

    @property
    def padding(self) -> PaddingEstimate | None:
        return self.packing.estimate if self.packing else self.unpacked_padding

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def needed(self) -> int:
        """What must fit: on a GPU the allocator's segments and the BLAS workspace, elsewhere the live tensors
        (with what offloading holds on the host: there the host is the device)."""
        return self.reserved + self.workspace if self.on_gpu else self.peak + self.host_activations

    @property
    def fits(self) -> bool:
        return self.needed <= self.memory

    @property
    def tokens_per_step(self) -> int:
        per_example = self.data.mean_tokens if self.data else self.seq
        return round(per_example * self.batch_size * self.grad_accum * self.world_size)

    @property
    def steps_per_epoch(self) -> int | None:
        if self.data is None:
            return None
        return math.ceil(self.data.examples / (self.batch_size * self.grad_accum * self.world_size))

    def advice(self) -> str:
        """What to change when the run does not fit, most effective first."""
        if self.fits:
            return ""
        options = []
        if self.packing and self.data and self.data.longest <= self.max_row_tokens < self.seq:
            options.append(f"pack_tokens = {self.max_row_tokens} (rows of fewer tokens, more of them)")
        if not self.packing and 1 <= self.max_batch_size < self.batch_size:
            accum = math.ceil(self.batch_size * self.grad_accum / self.max_batch_size)
            options.append(f"batch_size = {self.max_batch_size} with grad_accum = {accum} (the same examples per "
                           "step)")
        if self.checkpointing != "layer":
            options.append("gradient_checkpointing = true with checkpoint_policy = \"layer\"")
        options.append("a shorter max_len")
        if self.mode == "full":
            options.append("mode = \"dora\" (frozen base in bf16, no gradients or optimizer state for it)")
        return "; or ".join(options)

    @property
    def weights_text(self) -> str:
        if self.mode == "full":
            return "fp32, trained"
        if self.base_quant == "nf4":
            return f"frozen base: the target linears in 4-bit NF4, the rest {self.dtype}"
        return "frozen base"

    def to_text(self) -> str:
        trainable_share = 100 * self.params_trainable / max(self.params_base, 1)
        lines = [
            f"plan: {self.model}; {self.mode}, {self.dtype}, gradient checkpointing {self.checkpointing}; "
            f"{self.batch_text}, {self.completions} completion positions; "
            f"accumulation {self.grad_accum}; {self.world_size} rank(s); per rank"
            + ("" if self.memory_source == "given" else f" on {self.device}"),
            f"  parameters      {self.params_base:,} in the model, {self.params_trainable:,} trainable "
            f"({trainable_share:.2f} %)",
            f"  weights         {_gb(self.weights)}   {self.weights_text}",
            f"  adapters        {_gb(self.adapters)}   trainable tensors, fp32" if self.mode != "full" else None,
            f"  gradients       {_gb(self.gradients)}   fp32",
            f"  optimizer       {_gb(self.optimizer)}   AdamW: two fp32 moments per trainable value",
            f"  activations     {_gb(self.activations)}   saved for backward at {self.forward_shape} "
            f"({self.checkpointing}); {self.activations_no_checkpointing / GB:.2f} GB without checkpointing",
            f"  on the host     {_gb(self.host_activations)}   activations offloaded between forward and backward "
            "(pinned host memory)" if self.host_activations else None,
            f"  loss            {_gb(self.logits)}   held until the backward at {self.completions} completion "
            f"positions ({self.loss_held})",
            f"  temporary peaks {_gb(self.recompute_peak)}   largest layer's recompute; "
            f"{self.vocabulary_peak / GB:.2f} GB the loss over the vocabulary{self.loss_chunks}",
            f"  predicted peak  {_gb(self.peak)}   live tensors"
            + ("" if self.on_gpu else f"; of {self.memory / GB:.2f} GB ({self.memory_source}): "
               + ("fits" if self.fits else "DOES NOT FIT")),
            f"  on a GPU        {_gb(self.reserved + self.workspace)}   reserved by PyTorch's caching allocator at "
            "that peak" + (f", with {self.workspace / 2**20:.0f} MiB of BLAS workspace" if self.workspace else "")
            + (f"; of {self.memory / GB:.2f} GB ({self.memory_source}): " + ("fits" if self.fits else "DOES NOT FIT")
               if self.on_gpu else " (were this run on one)"),
            f"  largest that fits: batch_size {self.max_batch_size} at {self.batch_tokens} tokens; a packed row of "
            f"{self.max_row_tokens:,} tokens"
            + (" (the model's context length: longer rows were not tried)" if self.max_row_tokens >= self.row_limit
               else ""),
            f"  tokens per optimizer step {self.tokens_per_step:,}"
            + (f" ({self.data.mean_tokens:.0f} per example on average in {self.data.source}, "
               f"{self.data.examples:,} examples); {self.steps_per_epoch:,} steps per epoch"
               if self.data else " (every example at max_len: the data was not read)"),
        ]
        if self.padding is not None:
            lines.append(f"  padding         {self.padding.describe()}")
        if self.seconds_per_step is not None:
            lines.append(f"  probe           {self.seconds_per_step:.2f} s per step (median of {self.probe_steps} "
                         f"steps after the first): {format_duration(self.projected_seconds)} for "
                         f"{self.total_steps:,} steps")
        if self.device == "cpu" and self.memory_source != "given":
            lines.append("  note: " + self.cpu_rss_note())
        if self.per_rank:
            lines.append(f"  per rank on {self.world_size} ranks: " + "; ".join(
                f"{strategy} {size / GB:.2f} GB" for strategy, size in self.per_rank.items()))
        lines += [f"  note: {note}" for note in self.notes]
        if not self.fits:
            lines.append(f"  to fit: {self.advice()}")
        return "\n".join(line for line in lines if line is not None)

    @property
    def projected_seconds(self) -> float | None:
        return None if self.seconds_per_step is None else self.seconds_per_step * self.total_steps

    def __str__(self) -> str:
        return self.to_text()


def _gb(size: int) -> str:
    return f"{size / GB:7.2f} GB"


def format_duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"
