"""Will it fit, and how long will it take? A memory and time plan for a training run, made before loading.

Nothing is loaded but config.json, the tokenizer and the data. One micro-batch of the run's shape is simulated
on fake tensors through the model the run trains (simulator.py), and each rank's memory is

    peak = weights + adapters + optimizer state + gradients (kept across micro-batches when accumulating)
           + the simulated micro-batch's peak (saved activations + the largest temporary on top of them)

for one process, or per strategy across ranks (DDP's second copy of the gradients; FSDP's shards, root and
gathered layers). On a GPU what must fit is what PyTorch's caching allocator reserves (allocator.py) plus the
BLAS workspace; the largest batch (or packed row) that fits is searched for by simulating others (search.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ADAPTER_NAMES, TrainConfig
from ..data.dataset import RunData
from ..data.packing import PaddingEstimate, estimate_padding
from ..model.attention_report import training_kernel
from ..model.folders import parse_size
from ..model.qwen3 import Qwen3Config
from ..train.device import compute_dtype, default_device
from ..train.schedule import optimizer_steps
from .allocator import blas_workspace
from .report import GB, Alternatives, DataShape, Packing, Plan, PlanError
from .search import largest_batch, largest_row
from .simulator import Activity, ParameterCounts, Simulator


@dataclass(frozen=True)
class MicroBatch:
    """The micro-batch the plan simulates: batch_size examples padded to the longest, or one packed row of up
    to pack_tokens tokens of which at most the data's largest completion share are completion positions (all
    of them when the data was not read: the worst case)."""
    batch: int
    tokens: int
    completion_len: int  # completion positions of one example at `tokens` (padded), or of the row (packed)
    share: float  # the largest share of an example's tokens that are completion

    @classmethod
    def of(cls, config: TrainConfig, data: DataShape | None) -> MicroBatch:
        share = data.completion_share if data else 1.0
        if config.packing:
            return cls(1, config.row_tokens, math.ceil(config.row_tokens * share), share)
        tokens = data.longest if data else config.max_len
        return cls(config.batch_size, tokens, data.longest_completion if data else tokens, share)

    def completions(self, batch: int, tokens: int) -> int:
        """Completion positions of `batch` examples (or rows) of `tokens` tokens."""
        return batch * (self.completion_len if tokens == self.tokens else math.ceil(tokens * self.share))


@dataclass(frozen=True)
class Footprint:
    """One rank at one micro-batch size: the simulated step, the live peak of each strategy and the run's own,
    what the caching allocator reserves at it, and what must fit (the reserve and BLAS workspace on a GPU,
    the live peak elsewhere)."""
    activity: Activity
    per_strategy: dict[str, int]
    peak: int
    reserved: int
    needed: int


class RankMemory:
    """What one rank holds at any micro-batch size under the run's strategy, each size simulated once."""

    def __init__(self, simulator: Simulator, config: TrainConfig, world_size: int, device: torch.device,
                 shape: MicroBatch):
        self.simulator, self.config, self.world_size, self.shape = simulator, config, world_size, shape
        self.counts = simulator.counts
        self.accumulating = config.grad_accum > 1
        gradients = self.counts.gradients
        # The weights, what trains, AdamW's two fp32 moments, and the gradients kept between micro-batches.
        self.replica_state = (self.counts.weight_bytes + self.counts.trainable_bytes + 2 * gradients
                              + (gradients if self.accumulating else 0))
        self.workspace = blas_workspace(device)
        self.on_gpu = device.type == "cuda"
        self._seen: dict[tuple[int, int], Footprint] = {}  # the searches revisit the run's own micro-batch

    def at(self, batch: int, tokens: int) -> Footprint:
        if (batch, tokens) not in self._seen:
            self._seen[batch, tokens] = self._footprint(batch, tokens)
        return self._seen[batch, tokens]

    def needed_at(self, batch: int, tokens: int) -> int:
        return self.at(batch, tokens).needed

    def _footprint(self, batch: int, tokens: int) -> Footprint:
        activity = self.simulator.micro_batch(batch, tokens, self.shape.completions(batch, tokens),
                                              with_grads=self.accumulating)
        replica = self.replica_state + activity.peak
        per_strategy = self._per_strategy(replica, activity)
        peak = per_strategy.get(self.config.strategy, per_strategy.get("one process"))
        # The allocator's replay is of one replica; what the strategy adds or shards away is carried over.
        reserved = self.simulator.reserved_peak(activity.events, self.accumulating) + peak - replica
        return Footprint(activity, per_strategy, peak, reserved,
                         reserved + self.workspace if self.on_gpu else peak)

    def _per_strategy(self, replica: int, activity: Activity) -> dict[str, int]:
        """The peak per rank: one process, or each strategy across world_size ranks."""
        if self.world_size == 1:
            return {"one process": replica}
        return {"ddp": replica + self.counts.gradients,  # DDP's buckets hold a second copy of the gradients
                "fsdp": fsdp_peak(self.counts, self.world_size, self.accumulating, activity.peak)}


def fsdp_peak(counts: ParameterCounts, ranks: int, accumulating: bool, step_peak: int) -> int:
    """A rank's peak under FSDP2 (train/fsdp.py's shard_model): its 1/ranks of every parameter and of the
    optimizer state; the root's parameters (embeddings, lm_head, final norm) whole through the step, and two
    decoder layers whole at a time (the one running and the one prefetched); gradients whole while they
    accumulate locally (no reduce-scatter before the last micro-batch), else sharded; the micro-batch's
    activations as in one process."""
    gradients = counts.gradients
    sharded = (counts.weight_bytes + counts.trainable_bytes + 2 * gradients) // ranks
    return sharded + counts.root_bytes + 2 * counts.layer_bytes + (gradients if accumulating else gradients // ranks) \
        + step_peak


def plan(config: TrainConfig, *, memory: int | str | None = None, device: torch.device | str | None = None,
         world_size: int = 1, model_config: Qwen3Config | None = None, data: DataShape | None = None) -> Plan:
    """The memory and time plan of `config` per rank (see the module docstring).

    Reads config.model's config.json (unless `model_config` is given) and config.train_data (unless `data`
    is given; without either, every example is taken as max_len tokens, all completion: the worst case).
    `memory` overrides the device's own figure, e.g. "24GiB" to plan a GPU run from another machine."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) sees no CUDA or ROCm GPU; plan "
                         "a GPU run where the card is, or here with memory= the card's size")
    model_config = model_config or Qwen3Config.from_pretrained(config.model)
    data, notes = _data_shape(config, data)
    if config.packing and data:
        config.check_packing(data.lengths)  # before anything is loaded
    dtype = compute_dtype(config.dtype, device)
    attention, note = planned_attention(config, model_config, device, dtype)
    shape = MicroBatch.of(config, data)
    simulator = Simulator(model_config, config, device, dtype, attention)
    ranks = RankMemory(simulator, config, world_size, device, shape)
    here = ranks.at(shape.batch, shape.tokens)
    completions = shape.completions(shape.batch, shape.tokens)
    available, source = (parse_size(memory), "given") if memory is not None else available_memory(device)
    notes += [text for text in (note, _decimal_size_note(memory, available)) if text]
    recompute, vocabulary = simulator.temporary_peaks(shape.batch, shape.tokens, completions)
    counts = simulator.counts
    batch_tokens = data.longest if data else config.max_len
    row_limit = max(model_config.max_position_embeddings, shape.tokens)  # rows longer than its context: not asked
    return Plan(
        model=f"{config.model or 'model'} ({model_config.num_hidden_layers} layers, hidden "
              f"{model_config.hidden_size}, vocabulary {model_config.vocab_size:,})",
        mode="full" if config.mode == "full" else
        f"{ADAPTER_NAMES[config.mode]} r{config.rank} on {', '.join(config.targets)}",
        dtype=str(dtype).removeprefix("torch."), device=device.type, batch_size=config.batch_size,
        seq=shape.tokens, completions=completions, grad_accum=config.grad_accum, world_size=world_size,
        checkpointing=config.checkpoint_policy if config.gradient_checkpointing else "off",
        params_base=counts.base, params_trainable=counts.trainable,
        weights=counts.weight_bytes if config.mode != "full" else counts.trainable_bytes, base_quant=config.base_quant,
        adapters=counts.trainable_bytes if config.mode != "full" else 0,
        gradients=counts.gradients, optimizer=2 * counts.gradients, activations=here.activity.saved,
        logits=max(here.activity.logits, 0), loss_chunk=config.loss_chunk, recompute_peak=recompute,
        vocabulary_peak=vocabulary, peak=here.peak,
        reserved=here.reserved, workspace=ranks.workspace, memory=available, memory_source=source,
        alternatives=alternatives(ranks, available, batch_tokens, row_limit), row_limit=row_limit,
        batch_tokens=batch_tokens, host_activations=here.activity.host,
        data=data, notes=notes, per_rank=here.per_strategy if world_size > 1 else {},
        heap_release=config.heap_release,
        packing=Packing(shape.tokens, padding_of(config, data)) if config.packing else None,
        unpacked_padding=None if config.packing else padding_of(config, data),
        total_steps=optimizer_steps(config, data.examples, world_size) if data else config.max_steps,
    )


def alternatives(ranks: RankMemory, available: int, batch_tokens: int, row_limit: int) -> Alternatives:
    """The searches for the largest batch (of the data's longest example) and the longest packed row that fit
    `available`, and the run without checkpointing; none of them runs until it is read."""
    config, shape = ranks.config, ranks.shape

    def known(rows: bool) -> tuple[int, int]:
        """A point the search starts from: the run's own micro-batch when it is of the kind searched (a packed
        row for the row search, a batch for the batch one), else one example of the data's longest."""
        if rows == config.packing:
            return (shape.tokens if rows else shape.batch), ranks.needed_at(shape.batch, shape.tokens)
        return (batch_tokens if rows else 1), ranks.needed_at(1, batch_tokens)

    def unchecked() -> int:
        if not config.gradient_checkpointing:
            return ranks.at(shape.batch, shape.tokens).activity.saved
        return ranks.simulator.saved_without_checkpointing(shape.batch, shape.tokens,
                                                            shape.completions(shape.batch, shape.tokens))

    return Alternatives(
        lambda: largest_batch(lambda batch: ranks.needed_at(batch, batch_tokens), available, known(rows=False)),
        lambda: largest_row(lambda tokens: ranks.needed_at(1, tokens), available, known(rows=True), limit=row_limit),
        unchecked)


def _data_shape(config: TrainConfig, data: DataShape | None) -> tuple[DataShape | None, list[str]]:
    """`data`, or config.train_data's shape read from the file, or None with a note saying so."""
    if data is not None:
        return data, []
    if config.train_data and Path(config.train_data).is_file():
        return DataShape.of(RunData.read(config, evaluation=False).train), []
    return None, [f"train_data {config.train_data!r} was not read: every example is taken as max_len tokens, all "
                  "of them completion (the worst case)"]


def _decimal_size_note(memory: int | str | None, available: int) -> str | None:
    """For a size written in GB (10^9 bytes): what it is in GiB, the unit cards report theirs in."""
    if not isinstance(memory, str) or not (decimal := re.fullmatch(r"\s*([\d.]+)\s*GB\s*", memory, re.IGNORECASE)):
        return None
    number = decimal.group(1)
    return (f"memory {memory!r} is read as {available:,} bytes (GB = 10^9), {available / 2**30:.2f} GiB; cards "
            f"report GiB, and a {number} GiB card holds {float(number) * 2**30 / 1e9:.2f} GB: write {number}GiB "
            "for it")


def count_parameters(model_config: Qwen3Config, config: TrainConfig,
                     device: torch.device | str = "cpu") -> ParameterCounts:
    """Parameters of the model as `config` trains it, counted on fake tensors (nothing allocated)."""
    device = torch.device(device)
    return Simulator(model_config, config, device, compute_dtype(config.dtype, device), "sdpa").counts


def padding_of(config: TrainConfig, data: DataShape | None) -> PaddingEstimate | None:
    """Padding unpacked and rows packed, from the data's real lengths (None when the data was not read)."""
    if data is None or not data.lengths:
        return None
    return estimate_padding(data.lengths, config.batch_size, config.grad_accum, max(config.row_tokens, data.longest))


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes the run can use on `device`, and where the figure comes from."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}, of {total / GB:.1f} GB"
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024, "available RAM"


def planned_attention(config: TrainConfig, model_config: Qwen3Config, device: torch.device,
                      dtype: torch.dtype) -> tuple[str, str | None]:
    """The attention the plan simulates, and a note when it is not the one asked for: on a GPU whose SDPA
    gives training only the math kernel (Navi31 without AOTriton's experimental kernels), its fp32 T x T
    scores are part of every layer's activations, and the plan must count them."""
    if config.attention_kernel == "math" or device.type != "cuda":
        return config.attention_kernel, None
    kernel = training_kernel(model_config.num_attention_heads, model_config.num_key_value_heads,
                             model_config.head_dim, device, dtype)
    if kernel != "math":
        return config.attention_kernel, None
    return "math", ("SDPA gives training only the math kernel on this GPU: its fp32 T x T attention scores are "
                    "counted (on ROCm, TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1 enables the fused kernels)")


def check_fits(result: Plan) -> None:
    """Stop a run whose plan does not fit, before anything is loaded."""
    if not result.fits:
        raise PlanError(f"the run does not fit:\n{result.to_text()}")
