"""Will it fit, and how long will it take? A memory and time plan for a training run, made before loading.

Nothing is loaded but config.json, the tokenizer and the data. The model is built under FakeTensorMode
(tensors with shapes and dtypes but no storage), wrapped in DoRA as training wraps it, and one micro-batch
of `batch_size x max_len` runs forward and backward through the same modules, checkpointing and autocast
as a real step, while a dispatch mode adds up the bytes of every tensor the step creates and takes them
off again when they are freed. So the activation figures come from the code that will run, not from a
formula that could drift from it: a change to the model, DoRA or the checkpoint policy changes the plan.

    peak = weights + adapters + optimizer state + gradients (kept across micro-batches when accumulating)
           + the simulated micro-batch's peak (saved activations + the largest temporary on top of them)

The completion positions the loss reads are indices found on the CPU with the batch (loss.py), so the
simulation selects them as a real step does, by index_select, only with positions standing in for them.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from .allocator_model import CachingAllocator, blas_workspace
from .config import TrainConfig, attention_kernel, compute_dtype, default_device, optimizer_steps
from .data import IGNORE_INDEX, ScoredDataset, read_training_data
from .dora import apply_dora, dora_layers
from .model import Qwen3Config, Qwen3ForCausalLM
from .packing import PaddingEstimate, estimate_padding
from .sdpa_report import training_kernel
from .weights import parse_size

GB = 1e9


class PlanError(ValueError):
    """The run does not fit the device; the message holds the plan and what to change."""


class _LiveBytes(TorchDispatchMode):
    """Bytes held by tensors created under this mode: added when an op allocates a new storage, taken off
    when Python frees it (storages keep their Python object, so a weak reference sees the free). Views
    allocate nothing and are not counted."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.events: list[tuple[int, int]] = []  # (storage number, bytes) when allocated, (number, 0) when freed
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def mark(self) -> int:
        """Start a new peak measurement from here; returns the bytes held now."""
        self.peak = self.now
        return self.now

    def _free(self, number: int, size: int) -> None:
        self.now -= size
        self.events.append((number, 0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, tuple | list) else (out,)
        for spec, tensor in zip(func._schema.returns, outputs, strict=False):
            if isinstance(tensor, torch.Tensor) and spec.alias_info is None:
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    size = self._seen[storage] = storage.nbytes()
                    self.now += size
                    self.peak = max(self.peak, self.now)
                    self.events.append((len(self.events), size))
                    weakref.finalize(storage, self._free, self.events[-1][0], size)
        return out


@dataclass
class Activity:
    """What one simulated micro-batch holds: bytes saved for backward when the forward is done, bytes of
    the vocabulary projection at the loss, and the step's peak (all on top of the persistent state)."""
    saved: int
    logits: int
    peak: int
    events: list[tuple[int, int]] = field(default_factory=list, repr=False, compare=False)  # _LiveBytes.events


def _fake_model(model_config: Qwen3Config, config: TrainConfig, dtype: torch.dtype) -> Qwen3ForCausalLM:
    """The model as training holds it (frozen base in `dtype` and fp32 adapters, or all fp32 for full
    fine-tuning), built from fake tensors. Call inside the FakeTensorMode."""
    weights_dtype = dtype if config.mode == "dora" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(weights_dtype)  # created in their dtype: no fp32 copy to cast from
    try:
        model = Qwen3ForCausalLM(model_config)
    finally:
        torch.set_default_dtype(previous)
    if config.mode == "dora":
        apply_dora(model, config.rank, config.alpha, config.dropout, config.targets, seed=config.seed)
    else:
        model.requires_grad_(True)
    model.set_gradient_checkpointing(config.gradient_checkpointing, policy=config.checkpoint_policy)
    return model.train()


def _autocast(dtype: torch.dtype):
    """What the Trainer runs the forward under: bf16 autocast, or nothing for fp32."""
    return torch.autocast("cpu", dtype=dtype) if dtype == torch.bfloat16 else nullcontext()


def _simulate_micro_batch(model: Qwen3ForCausalLM, batch: int, seq: int, completions: int,
                          dtype: torch.dtype) -> Activity:
    """Forward and backward of one micro-batch under the live-bytes tracker (inside the FakeTensorMode)."""
    tracker = _LiveBytes()
    with tracker:
        ids = torch.zeros(batch, seq, dtype=torch.long)
        targets = torch.zeros(completions, dtype=torch.long)
        with _autocast(dtype):
            hidden = model.hidden_states(ids)
            saved = tracker.now
            selected = hidden.flatten(0, 1).index_select(0, torch.arange(completions))  # as forward(logits_at=)
            logits = model.lm_head(selected)
            loss = F.cross_entropy(logits.float(), targets, reduction="none").sum()
            at_loss = tracker.now
        del hidden, selected, logits
        loss.backward()
        del loss
    return Activity(saved, at_loss - saved, tracker.peak, tracker.events)


def _temporary_peaks(model: Qwen3ForCausalLM, batch: int, seq: int, completions: int,
                     dtype: torch.dtype) -> tuple[int, int]:
    """(the largest layer's recompute, the vocabulary projection): forward + backward of one decoder layer
    (or only its MLP, under the "mlp" policy) and of the vocabulary projection, each alone."""
    config, layer = model.config, model.model.layers[-1]
    activation_dtype = dtype if dtype == torch.bfloat16 else model.model.embed_tokens.weight.dtype

    def peak_of(run) -> int:
        tracker = _LiveBytes()
        with tracker:
            start = tracker.mark()
            with _autocast(dtype):
                out = run()
            out.float().sum().backward()
        return tracker.peak - start

    h = torch.zeros(batch, seq, config.hidden_size, dtype=activation_dtype, requires_grad=True)
    cos, sin = model.rope(torch.arange(seq).expand(batch, seq), activation_dtype)
    previous, layer.checkpointing = layer.checkpointing, None
    try:
        if previous == "mlp":
            recompute = peak_of(lambda: layer.feed_forward(h))
        else:
            recompute = peak_of(lambda: layer(h, cos, sin, None))
    finally:
        layer.checkpointing = previous
    selected = torch.zeros(completions, config.hidden_size, dtype=activation_dtype, requires_grad=True)
    vocabulary = peak_of(lambda: F.cross_entropy(model.lm_head(selected).float(),
                                                 torch.zeros(completions, dtype=torch.long), reduction="none"))
    return recompute, vocabulary


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
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    activations_no_checkpointing: int
    logits: int
    recompute_peak: int
    vocabulary_peak: int
    peak: int
    reserved: int  # what PyTorch's caching allocator would hold on a GPU at that peak (allocator_model.py)
    workspace: int  # the BLAS workspaces on this GPU (0 elsewhere)
    memory: int
    memory_source: str
    max_batch_size: int
    data: DataShape | None = None
    seconds_per_step: float | None = None
    probe_steps: int = 0
    total_steps: int = 0
    per_rank: dict[str, int] = field(default_factory=dict)  # predicted peak per rank by strategy (ranks > 1)
    heap_release: str = "off"  # TrainConfig.heap_release: whether CPU RSS is held near the live peak
    notes: list[str] = field(default_factory=list)
    packing: Packing | None = None  # with TrainConfig.packing: the rows (batch_size and seq are one row's)
    unpacked_padding: PaddingEstimate | None = None  # without packing, when the data was read

    def cpu_rss_note(self) -> str:
        """How peak RSS compares with the plan on a CPU, as benchmarks/plan_accuracy.py measured it."""
        if self.heap_release == "layers":
            return ("with heap_release 'layers' peak RSS measured within 10 % of this figure "
                    "(benchmarks/RESULTS.md, plan accuracy)")
        return ("the peak counts live tensors (what a GPU allocator reports); on a CPU glibc's heap keeps freed "
                "blocks resident and peak RSS measured 1.15-1.69x this figure, within 10 % of it with heap_release "
                "'layers' (benchmarks/RESULTS.md, plan accuracy)")

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
        """What must fit: on a GPU the allocator's segments and the BLAS workspace, elsewhere the live tensors."""
        return self.reserved + self.workspace if self.on_gpu else self.peak

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
        if self.packing and self.data and self.data.longest <= self.packing.largest_fitting < self.seq:
            options.append(f"pack_tokens = {self.packing.largest_fitting} (rows of fewer tokens, more of them)")
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

    def to_text(self) -> str:
        trainable_share = 100 * self.params_trainable / max(self.params_base, 1)
        lines = [
            f"plan: {self.model}; {self.mode}, {self.dtype}, gradient checkpointing {self.checkpointing}; "
            f"{self.batch_text}, {self.completions} completion positions; "
            f"accumulation {self.grad_accum}; {self.world_size} rank(s); per rank"
            + ("" if self.memory_source == "given" else f" on {self.device}"),
            f"  parameters      {self.params_base:,} in the model, {self.params_trainable:,} trainable "
            f"({trainable_share:.2f} %)",
            f"  weights         {_gb(self.weights)}   {'fp32, trained' if self.mode == 'full' else 'frozen base'}",
            f"  adapters        {_gb(self.adapters)}   trainable tensors, fp32" if self.mode != "full" else None,
            f"  gradients       {_gb(self.gradients)}   fp32",
            f"  optimizer       {_gb(self.optimizer)}   AdamW: two fp32 moments per trainable value",
            f"  activations     {_gb(self.activations)}   saved for backward at {self.forward_shape} "
            f"({self.checkpointing}); {self.activations_no_checkpointing / GB:.2f} GB without checkpointing",
            f"  logits          {_gb(self.logits)}   at {self.completions} completion positions (logits, fp32 "
            "copy, log-softmax)",
            f"  temporary peaks {_gb(self.recompute_peak)}   largest layer's recompute; "
            f"{self.vocabulary_peak / GB:.2f} GB the vocabulary projection",
            f"  predicted peak  {_gb(self.peak)}   live tensors"
            + ("" if self.on_gpu else f"; of {self.memory / GB:.2f} GB ({self.memory_source}): "
               + ("fits" if self.fits else "DOES NOT FIT")),
            f"  on a GPU        {_gb(self.reserved + self.workspace)}   reserved by PyTorch's caching allocator at "
            "that peak" + (f", with {self.workspace / 2**20:.0f} MiB of BLAS workspace" if self.workspace else "")
            + (f"; of {self.memory / GB:.2f} GB ({self.memory_source}): " + ("fits" if self.fits else "DOES NOT FIT")
               if self.on_gpu else " (were this run on one)"),
            (f"  largest pack_tokens that fits: {self.packing.largest_fitting:,}" if self.packing else
             f"  largest batch_size that fits at {self.seq} tokens: {self.max_batch_size}"),
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


def _reserved_peak(model: Qwen3ForCausalLM, events: list[tuple[int, int]], accumulating: bool) -> int:
    """The most PyTorch's caching allocator would reserve (allocator_model.py) for the persistent tensors,
    allocated one by one (the weights; AdamW's two fp32 moments per trainable tensor, and its gradient
    when accumulation keeps it between micro-batches), then the micro-batch's allocations and frees."""
    allocator = CachingAllocator()
    for p in model.parameters():
        allocator.allocate(p.numel() * p.element_size())
        for _ in range((2 + accumulating) * p.requires_grad):
            allocator.allocate(p.numel() * 4)
    blocks = {}
    for number, size in events:
        if size:
            blocks[number] = allocator.allocate(size)
        else:
            allocator.free(blocks.pop(number))
    return allocator.peak_reserved


class _Simulator:
    """Simulated micro-batches of one model and config at any batch size (the fake model is built once)."""

    def __init__(self, model_config: Qwen3Config, config: TrainConfig, dtype: torch.dtype, attention: str):
        self.mode = FakeTensorMode()
        self.dtype = dtype
        self.attention_kernel = attention  # the math kernel's probabilities count as activations
        with self.faking():
            self.model = _fake_model(model_config, config, dtype)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def faking(self):
        with self.mode, attention_kernel(self.attention_kernel), warnings.catch_warnings():
            # DoRA's norm cache keys on data pointers; fake tensors have none (and warn), which is harmless here.
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            yield

    def micro_batch(self, batch: int, seq: int, completions: int, with_grads: bool) -> Activity:
        """With `with_grads`, gradients exist before the backward (accumulation's later micro-batches), so
        the backward adds into them instead of allocating them."""
        with self.faking():
            for _, layer in dora_layers(self.model):  # as after an optimizer step: ||W + sBA|| recomputed
                layer.forget_adapter_terms()
            for p in self.trainable:
                p.grad = torch.zeros_like(p) if with_grads else None
            try:
                return _simulate_micro_batch(self.model, batch, seq, completions, self.dtype)
            finally:
                for p in self.trainable:
                    p.grad = None

    def saved_without_checkpointing(self, batch: int, seq: int, completions: int) -> int:
        """Bytes a micro-batch saves for backward with gradient checkpointing off."""
        policies = [layer.checkpointing for layer in self.model.model.layers]
        self.model.set_gradient_checkpointing(False)
        try:
            return self.micro_batch(batch, seq, completions, with_grads=False).saved
        finally:
            for layer, policy in zip(self.model.model.layers, policies, strict=True):
                layer.checkpointing = policy

    def temporary_peaks(self, batch: int, seq: int, completions: int) -> tuple[int, int]:
        with self.faking():
            return _temporary_peaks(self.model, batch, seq, completions, self.dtype)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@dataclass(frozen=True)
class ParameterCounts:
    base: int  # the model's own parameters (DoRA's are not among them)
    trainable: int
    weight_bytes: int  # what is not trained: the frozen base (none in full fine-tuning)
    trainable_bytes: int


def _count(model: Qwen3ForCausalLM, mode: str) -> ParameterCounts:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    base = sum(p.numel() for p in params) if mode == "full" else sum(p.numel() for p in frozen)
    return ParameterCounts(base, sum(p.numel() for p in trainable), _bytes(frozen), _bytes(trainable))


def count_parameters(model_config: Qwen3Config, config: TrainConfig,
                     device: torch.device | str = "cpu") -> ParameterCounts:
    """Parameters of the model as `config` trains it, counted on fake tensors (nothing allocated)."""
    with FakeTensorMode():
        return _count(_fake_model(model_config, config, compute_dtype(config.dtype, torch.device(device))),
                      config.mode)


def plan(config: TrainConfig, *, memory: int | str | None = None, device: torch.device | str | None = None,
         world_size: int = 1, model_config: Qwen3Config | None = None, data: DataShape | None = None) -> Plan:
    """The memory and time plan of `config` per rank (see the module docstring).

    Reads config.model's config.json (unless `model_config` is given) and config.train_data (unless `data`
    is given; without either, every example is taken as max_len tokens, all completion: the worst case).
    `memory` overrides the device's own figure, e.g. "24GB" to plan a GPU run from another machine."""
    device = torch.device(device) if device is not None else default_device()
    notes = []
    if model_config is None:
        model_config = Qwen3Config.from_pretrained(config.model)
    if data is None and config.train_data and Path(config.train_data).is_file():
        data = DataShape.of(read_training_data(config))
    elif data is None:
        notes.append(f"train_data {config.train_data!r} was not read: every example is taken as max_len tokens, "
                     "all of them completion (the worst case)")
    dtype = compute_dtype(config.dtype, device)
    if config.packing and data:
        config.check_packing(data.lengths)  # before anything is loaded
    # A micro-batch: batch_size examples padded to the longest, or one packed row of up to pack_tokens tokens
    # of which at most the data's largest completion share are completion positions (all, unread).
    share = data.completion_share if data else 1.0
    seq = config.row_tokens if config.packing else (data.longest if data else config.max_len)
    completion_len = math.ceil(seq * share) if config.packing else (data.longest_completion if data else seq)
    attention, note = planned_attention(config, model_config, device, dtype)
    notes += [note] if note else []
    simulator = _Simulator(model_config, config, dtype, attention)
    counts = _count(simulator.model, config.mode)
    gradients = 4 * counts.trainable
    persistent = counts.weight_bytes + counts.trainable_bytes + 2 * gradients  # + AdamW's two fp32 moments
    accumulating = config.grad_accum > 1

    def strategies(activity: Activity) -> dict[str, int]:
        """The peak per rank: one process, or each strategy across world_size ranks."""
        replica = persistent + (gradients if accumulating else 0) + activity.peak
        if world_size == 1:
            return {"one process": replica}
        return {"ddp": replica + gradients,  # DDP's buckets hold a second copy of the gradients
                "fsdp": _fsdp_peak(simulator.model, counts, world_size, accumulating, activity.peak)}

    @functools.cache  # the searches below revisit the run's own micro-batch
    def peak_at(batch: int, tokens: int) -> tuple[int, Activity]:
        completions = batch * (completion_len if tokens == seq else math.ceil(tokens * share))
        activity = simulator.micro_batch(batch, tokens, completions, with_grads=accumulating)
        peaks = strategies(activity)
        return peaks.get(config.strategy, peaks.get("one process")), activity

    def reserved_of(peak: int, activity: Activity) -> int:
        # The allocator's replay is of one replica; what the strategy adds or shards away is carried over.
        replica = persistent + (gradients if accumulating else 0) + activity.peak
        return _reserved_peak(simulator.model, activity.events, accumulating) + peak - replica

    workspace = blas_workspace(device)

    def needed_at(batch: int, tokens: int = seq) -> int:
        """What must fit (Plan.needed) at this micro-batch: on a GPU the allocator's reserve and the BLAS
        workspace, which the largest batch or row is judged by there, else the live peak."""
        peak, activity = peak_at(batch, tokens)
        return reserved_of(peak, activity) + workspace if device.type == "cuda" else peak

    batch = 1 if config.packing else config.batch_size
    completions = batch * completion_len
    peak, activity = peak_at(batch, seq)
    per_rank = strategies(activity) if world_size > 1 else {}
    reserved = reserved_of(peak, activity)
    needed = reserved + workspace if device.type == "cuda" else peak
    recompute, vocabulary = simulator.temporary_peaks(batch, seq, completions)
    saved_unchecked = (simulator.saved_without_checkpointing(batch, seq, completions)
                       if config.gradient_checkpointing else activity.saved)
    available, source = (parse_size(memory), "given") if memory is not None else available_memory(device)
    if isinstance(memory, str) and (decimal := re.fullmatch(r"\s*([\d.]+)\s*GB\s*", memory, re.IGNORECASE)):
        number = decimal.group(1)
        notes.append(f"memory {memory!r} is read as {available:,} bytes (GB = 10^9), {available / 2**30:.2f} GiB; "
                     f"cards report GiB, and a {number} GiB card holds {float(number) * 2**30 / 1e9:.2f} GB: "
                     f"write {number}GiB for it")
    packing = unpacked_padding = None
    if config.packing:
        packing = Packing(seq, _largest_row(lambda tokens: needed_at(1, tokens), available, (seq, needed)),
                          _padding_of(config, data))
    else:
        unpacked_padding = _padding_of(config, data)
    return Plan(
        model=f"{config.model or 'model'} ({model_config.num_hidden_layers} layers, hidden "
              f"{model_config.hidden_size}, vocabulary {model_config.vocab_size:,})",
        mode="full" if config.mode == "full" else f"DoRA r{config.rank} on {', '.join(config.targets)}",
        dtype=str(dtype).removeprefix("torch."), device=device.type, batch_size=config.batch_size, seq=seq,
        completions=completions, grad_accum=config.grad_accum, world_size=world_size,
        checkpointing=config.checkpoint_policy if config.gradient_checkpointing else "off",
        params_base=counts.base, params_trainable=counts.trainable,
        weights=counts.weight_bytes if config.mode == "dora" else counts.trainable_bytes,
        adapters=counts.trainable_bytes if config.mode == "dora" else 0,
        gradients=gradients, optimizer=2 * gradients, activations=activity.saved,
        activations_no_checkpointing=saved_unchecked, logits=activity.logits, recompute_peak=recompute,
        vocabulary_peak=vocabulary, peak=peak, reserved=reserved, workspace=workspace,
        memory=available, memory_source=source,
        max_batch_size=_largest_batch(needed_at, available, (batch, needed)), data=data, notes=notes,
        per_rank=per_rank, heap_release=config.heap_release, packing=packing, unpacked_padding=unpacked_padding,
        total_steps=optimizer_steps(config, data.examples, world_size) if data else config.max_steps,
    )


def _fsdp_peak(model: Qwen3ForCausalLM, counts: ParameterCounts, ranks: int, accumulating: bool,
               step_peak: int) -> int:
    """A rank's peak under FSDP2 (distributed.shard_model): its 1/ranks of every parameter and of the
    optimizer state; the root's parameters (embeddings, lm_head, final norm) whole through the step, and two
    decoder layers whole at a time (the one running and the one prefetched); gradients whole while they
    accumulate locally (no reduce-scatter before the last micro-batch), else sharded; the micro-batch's
    activations as in one process."""
    layer = _bytes(model.model.layers[0].parameters())
    root = _bytes(model.parameters()) - layer * len(model.model.layers)
    gradients = 4 * counts.trainable
    sharded = (counts.weight_bytes + counts.trainable_bytes + 2 * gradients) // ranks
    return sharded + root + 2 * layer + (gradients if accumulating else gradients // ranks) + step_peak


@dataclass(frozen=True)
class Packing:
    """The plan of a packed run: rows of `row_tokens` (the micro-batch simulated), the largest that fits."""
    row_tokens: int
    largest_fitting: int
    estimate: PaddingEstimate | None  # rows per step from the data's real lengths (None: data not read)


def _padding_of(config: TrainConfig, data: DataShape | None) -> PaddingEstimate | None:
    """Padding unpacked and rows packed, from the data's real lengths (None when the data was not read)."""
    if data is None or not data.lengths:
        return None
    return estimate_padding(data.lengths, config.batch_size, config.grad_accum, max(config.row_tokens, data.longest))


def _largest_row(needed_at, memory: int, known: tuple[int, int], limit: int = 1 << 20) -> int:
    """The largest packed row (tokens) whose predicted need fits `memory` (0 if none does): doubling from a
    known point, then bisection to within 1 %. Attention under the math kernel grows as T^2, so no line."""
    tokens, peak = known
    low, high = (tokens, None) if peak <= memory else (0, tokens)
    while high is None:
        if low >= limit:
            return limit
        candidate = min(2 * low, limit)
        if needed_at(candidate) <= memory:
            low = candidate
        else:
            high = candidate
    while high - low > max(1, low // 100):
        middle = (low + high) // 2
        low, high = (middle, high) if needed_at(middle) <= memory else (low, middle)
    return low


def _largest_batch(needed_at, memory: int, known: tuple[int, int], limit: int = 4096) -> int:
    """The largest batch size whose predicted need fits `memory` (0 if not even one example fits). Memory
    grows about linearly with the batch, so two points (`known` is one: batch, need) give a line, and its
    guess is taken when it fits. Where it does not (the allocator's rounding bends the line), lines through
    batch 1 and each failed guess (secant steps) find a batch that fits, and bisection closes the gap to the
    smallest that failed, to within 1/16."""
    one = needed_at(1)
    if one > memory:
        return 0

    def secant(batch: int, need: int) -> int:
        return max(1, 1 + (memory - one) * (batch - 1) // max(need - one, 1))

    other, other_need = known if known[0] > 1 else (2, needed_at(2))
    guess = min(limit, secant(other, other_need))
    need = needed_at(guess)
    if need <= memory:
        return guess
    fails = guess
    while (guess := min(fails - 1, secant(fails, need))) > 1 and (need := needed_at(guess)) > memory:
        fails = guess
    fits = guess
    while fails - fits > max(1, fits // 16):
        middle = (fits + fails) // 2
        fits, fails = (middle, fails) if needed_at(middle) <= memory else (fits, middle)
    return fits


def check_fits(result: Plan) -> None:
    """Stop a run whose plan does not fit, before anything is loaded."""
    if not result.fits:
        raise PlanError(f"the run does not fit:\n{result.to_text()}")

