"""A training micro-batch simulated on fake tensors, its bytes counted as the real step allocates and frees them.

The model is the one the run trains (train/builder.py's prepare_model, built from config.json alone) under
FakeTensorMode: tensors with shapes and dtypes but no storage. One micro-batch runs forward and backward
through the same modules, checkpointing and autocast as a real step, while a dispatch mode (LiveBytes) adds
up the bytes of every tensor the step creates and takes them off again when they are freed. So the
activation figures come from the code that will run, not from a formula that could drift from it.

The step's loss is the real one (train/loss.py, the vocabulary in chunks of loss_chunk positions), on loss
positions standing in for the batch's: indices, as a real step's are.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import TrainConfig
from ..data.batch import Batch, LossPositions
from ..model.lora import adapter_layers
from ..model.nf4 import quantized_layers
from ..model.offload import HostActivations
from ..model.qwen3 import Qwen3Config, Qwen3ForCausalLM
from ..model.vocab_loss import token_cross_entropy
from ..train.builder import apply_training_settings, prepare_model
from ..train.device import attention_kernel
from ..train.loss import example_losses
from .allocator import CachingAllocator


class LiveBytes(TorchDispatchMode):
    """Bytes held by tensors created under this mode: added when an op allocates a new storage, taken off
    when Python frees it (storages keep their Python object, so a weak reference sees the free). Views
    allocate nothing and are not counted."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.host_now = self.host_peak = 0  # what went to host memory (offloaded activations), apart
        self.events: list[tuple[int, int]] = []  # (storage number, bytes) when allocated, (number, 0) when freed
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._to_host = False

    def mark(self) -> int:
        """Start a new peak measurement from here; returns the bytes held now."""
        self.peak = self.now
        return self.now

    @contextmanager
    def on_host(self):
        """What is allocated in this block is host memory: counted apart from the device's."""
        self._to_host = True
        try:
            yield
        finally:
            self._to_host = False

    def _free(self, number: int, size: int) -> None:
        self.now -= size
        self.events.append((number, 0))

    def _free_host(self, size: int) -> None:
        self.host_now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, tuple | list) else (out,)
        for spec, tensor in zip(func._schema.returns, outputs, strict=False):
            if isinstance(tensor, torch.Tensor) and spec.alias_info is None:
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    size = self._seen[storage] = storage.nbytes()
                    self._count(storage, size)
        return out

    def _count(self, storage, size: int) -> None:
        if self._to_host:
            self.host_now += size
            self.host_peak = max(self.host_peak, self.host_now)
            weakref.finalize(storage, self._free_host, size)
            return
        self.now += size
        self.peak = max(self.peak, self.now)
        self.events.append((len(self.events), size))
        weakref.finalize(storage, self._free, self.events[-1][0], size)


class CountedHostActivations(HostActivations):
    """HostActivations as a simulated step holds them: what goes to the host counted as host bytes, what comes
    back (this one, and the one before it on its way) as device bytes, as on a GPU."""

    def __init__(self, device: torch.device, tracker: LiveBytes):
        super().__init__(torch.device("cpu"))
        self.tracker = tracker

    def _copy_out(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.tracker.on_host():
            return tensor.detach().clone()

    def _copy_in(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.clone()


@dataclass
class Activity:
    """What one simulated micro-batch holds: bytes saved for backward when the layers are done, what the loss
    adds to them until the backward (it may free more than it keeps: the final hidden states go once the
    completion positions are selected), and the step's peak (all on top of the persistent state)."""
    saved: int
    logits: int
    peak: int
    events: list[tuple[int, int]] = field(default_factory=list, repr=False, compare=False)  # LiveBytes.events
    host: int = 0  # the most the step holds in host memory (activations offloaded there)


def autocast_for(dtype: torch.dtype):
    """What the Trainer runs the forward under: bf16 autocast, or nothing for fp32."""
    return torch.autocast("cpu", dtype=dtype) if dtype == torch.bfloat16 else nullcontext()


def simulate_micro_batch(model: Qwen3ForCausalLM, batch: int, seq: int, completions: int, dtype: torch.dtype,
                         loss_chunk: int = 0) -> Activity:
    """Forward and backward of one micro-batch through the training loss (train/loss.py), under the
    live-bytes tracker (inside the FakeTensorMode): `completions` loss positions spread over `batch` rows of
    `seq` tokens, each example's loss weighted over one denominator as a step does."""
    tracker, at_hidden = LiveBytes(), []
    hook = model.model.norm.register_forward_hook(lambda *_: at_hidden.append(tracker.now))
    offload = model.activation_offload
    if offload is not None:
        model.activation_offload = lambda device: CountedHostActivations(device, tracker)
    try:
        with tracker:
            counts = [min(max(completions - row * seq, 0), seq) for row in range(batch)]
            counts[-1] += completions - sum(counts)
            examples = torch.repeat_interleave(torch.arange(batch), torch.tensor(counts), output_size=completions)
            where = LossPositions(torch.arange(completions), torch.zeros(completions, dtype=torch.long), examples,
                                  torch.tensor(counts))
            ids = torch.zeros(batch, seq, dtype=torch.long)
            micro = Batch(ids, ids, torch.ones(batch), torch.full((batch,), seq), loss=where)
            with autocast_for(dtype):
                loss = (example_losses(model, micro, loss_chunk) * micro.weight).sum() / batch
                at_loss = tracker.now
            loss.backward()
            del loss
    finally:
        hook.remove()
        model.activation_offload = offload
    saved = at_hidden[0]  # what the layers keep for backward, when the final norm has run
    return Activity(saved, at_loss - saved, tracker.peak, tracker.events, tracker.host_peak)


def _temporary_peaks(model: Qwen3ForCausalLM, batch: int, seq: int, completions: int, dtype: torch.dtype,
                     loss_chunk: int) -> tuple[int, int]:
    """(the largest layer's recompute, the vocabulary projection): forward + backward of one decoder layer
    (or only its MLP, under the "mlp" policy) and of the loss over the vocabulary, each alone."""
    config, layer = model.config, model.model.layers[-1]
    activation_dtype = dtype if dtype == torch.bfloat16 else model.model.embed_tokens.weight.dtype

    def peak_of(run) -> int:
        tracker = LiveBytes()
        with tracker:
            start = tracker.mark()
            with autocast_for(dtype):
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
    vocabulary = peak_of(lambda: token_cross_entropy(selected, model.lm_head.weight,
                                                     torch.zeros(completions, dtype=torch.long), loss_chunk))
    return recompute, vocabulary


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@dataclass(frozen=True)
class ParameterCounts:
    base: int  # the model's own parameters (DoRA's are not among them)
    trainable: int
    weight_bytes: int  # what is not trained: the frozen base (none in full fine-tuning)
    trainable_bytes: int
    layer_bytes: int  # one decoder layer's parameters (FSDP gathers a layer or two at a time)
    root_bytes: int  # what is not in a decoder layer: embeddings, final norm, lm_head

    @property
    def gradients(self) -> int:
        """fp32 gradients of what trains (AdamW keeps two moments of the same size)."""
        return 4 * self.trainable


def held_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What a module holds for the run: its parameters, and a 4-bit base's codes and scales (buffers)."""
    quantized = [buffer for layer in quantized_layers(module).values() for buffer in layer.buffers()]
    return [*module.parameters(), *quantized]


def parameter_counts(model: Qwen3ForCausalLM, mode: str) -> ParameterCounts:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in held_tensors(model) if not p.requires_grad]
    # A 4-bit base's weights count as the weights its codes stand for.
    quantized_weights = sum(layer.in_features * layer.out_features for layer in quantized_layers(model).values())
    base = sum(p.numel() for p in params if mode == "full" or not p.requires_grad) + quantized_weights
    layer = _bytes(held_tensors(model.model.layers[0]))
    return ParameterCounts(base, sum(p.numel() for p in trainable), _bytes(frozen), _bytes(trainable), layer,
                           _bytes(held_tensors(model)) - layer * len(model.model.layers))


class Simulator:
    """Simulated micro-batches of one model and config at any batch size (the fake model is built once, by
    the builder the run uses)."""

    def __init__(self, model_config: Qwen3Config, config: TrainConfig, device: torch.device, dtype: torch.dtype,
                 attention: str):
        self.mode = FakeTensorMode()
        self.dtype, self.loss_chunk = dtype, config.loss_chunk
        self.attention_kernel = attention  # the math kernel's probabilities count as activations
        with self.faking():
            self.model = prepare_model(config, device, weights=False, model_config=model_config)
            apply_training_settings(self.model, config, compiled=False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.counts = parameter_counts(self.model, config.mode)

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
            for _, layer in adapter_layers(self.model):  # as after an optimizer step: ||W + sBA|| recomputed
                layer.forget_adapter_terms()
            for p in self.trainable:
                p.grad = torch.zeros_like(p) if with_grads else None
            try:
                return simulate_micro_batch(self.model, batch, seq, completions, self.dtype, self.loss_chunk)
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
            return _temporary_peaks(self.model, batch, seq, completions, self.dtype, self.loss_chunk)

    def reserved_peak(self, events: list[tuple[int, int]], accumulating: bool) -> int:
        """The most PyTorch's caching allocator would reserve (allocator.py) for the persistent tensors,
        allocated one by one (the weights; AdamW's two fp32 moments per trainable tensor, and its gradient
        when accumulation keeps it between micro-batches), then a micro-batch's allocations and frees."""
        allocator = CachingAllocator()
        for p in held_tensors(self.model):
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
