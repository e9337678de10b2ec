"""LoRA (low-rank adaptation) as one small module, and what every adapter layer shares (DoRA: dora.py; their
PEFT files: peft_files.py).

    y = W x + s * B A drop(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

Dropout touches only the adapter path, so a training step runs one base matmul, and W x + s B A x is one
addmm. A starts Kaiming-uniform and B at zero, as PEFT starts them, so a new adapter leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .shards import copy_whole_into, local

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
BLOCK_VALUES = 1 << 19  # ~2 MB of fp32: a block of rows that stays in cache while it is merged or quantized


def rows_per_block(cols: int) -> int:
    return max(1, BLOCK_VALUES // cols)


def adapter_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout for the adapter path, as (kept input, factor the caller applies to the rank-sized result).

    On the CPU the keep-mask is drawn from 16 random bits per element, four elements per 64-bit draw, and
    the 1 / (1 - p) rescale is left to the caller's small rank-sized product: five times faster than
    F.dropout, whose bernoulli_ took a fifth of a DoRA training step (p is resolved to 1/65536)."""
    if p <= 0:
        return x, 1.0
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # a compiled layer fuses F.dropout's draw
        return F.dropout(x, p, training=True), 1.0
    count = x.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    keep = words.view(torch.int16)[:count].view(x.shape) >= round(p * 65536) - 32768
    return torch.where(keep, x, 0.0), 1.0 / (1.0 - p)


def is_quantized(base: nn.Module) -> bool:
    """Whether a base linear is 4-bit (model/nf4.py's NF4Linear, known here by its codes, as nf4.py imports this
    module): its `weight` is dequantized on each read, and its codes say whether it changed."""
    return hasattr(base, "codes")


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """s: alpha / r, or rsLoRA's alpha / sqrt(r) (which keeps the update's size as the rank grows)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def initial_lora_A(rank: int, in_features: int, dtype: torch.dtype = torch.float32,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A as PEFT initialises it (Kaiming-uniform), drawn on the CPU, so one generator gives the same A on
    every device and every rank."""
    lora_A = torch.empty(rank, in_features, dtype=dtype)
    return nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)


class LoRALinear(nn.Module):
    """A frozen bias-free linear plus s B A on its input. DoRALinear extends it with a magnitude per row."""

    kind = "LoRA"

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, seed: int | None = None, rslora: bool = False):
        super().__init__()
        if base_layer.bias is not None:
            raise ValueError(f"{type(self).__name__} wraps bias-free linears (Qwen3 has no biases)")
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = lora_scaling(rank, alpha, rslora)
        for name, shape in self.adapter_shapes().items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=base_layer.weight.device)))
        self._cache: dict[str, tuple[tuple, object]] = {}
        self.seed = seed  # A's start, the same at every reset (None: drawn from torch's global generator)
        self.reset_adapter()
        self.dropout = float(dropout)
        self.adapter_enabled = True

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The trainable tensors this adapter adds, by name (PEFT's names without its suffixes)."""
        base = self.base_layer
        return {"lora_A": (self.rank, base.in_features), "lora_B": (base.out_features, self.rank)}

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """The starting point PEFT gives: A Kaiming-uniform from the layer's seed, B zero, so the layer starts as
        its base. A layer FSDP shards takes its own rows of A."""
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        copy_whole_into(self.lora_A, initial_lora_A(self.rank, self.base_layer.in_features, self.lora_A.dtype,
                                                    generator))
        local(self.lora_B).zero_()
        self._cache.clear()

    def _cached(self, name: str, tensors: tuple[torch.Tensor, ...], compute, *extra):
        """compute(), reused until one of `tensors` is replaced or changed in place (their version counters
        move), or inference mode is entered or left (its tensors cannot be saved for backward)."""
        key = (*(t._version for t in tensors), *(t.data_ptr() for t in tensors), torch.is_inference_mode_enabled(),
               *extra)
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            hit = (key, compute())
            self._cache[name] = hit
        return hit[1]

    def forget_adapter_terms(self) -> None:
        """Drop what is cached from A and B (not what comes from W alone), as an optimizer step makes it stale:
        the next forward recomputes it, as the first forward of every training step does."""
        self._cache = {name: hit for name, hit in self._cache.items() if name == "base_norm_sq"}

    def _base_state(self) -> torch.Tensor:
        """The tensor whose version and address say whether W changed: W, or a 4-bit base's codes."""
        base = self.base_layer
        return base.codes if is_quantized(base) else base.weight

    @torch.no_grad()
    def folded_terms(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """For inference, cached in `dtype`: A, the B that multiplies A x (here s B), and a per-row excess the
        base output is scaled by first (None: LoRA leaves W x as it is)."""
        def compute():
            return self.lora_A.to(dtype), (self.scaling * self.lora_B.float()).to(dtype), None

        return self._cached("folded", (self.lora_A, self.lora_B), compute, dtype)

    def rescaled(self, combined: torch.Tensor) -> torch.Tensor:
        """What the layer does to W x + s B A x (flattened to rows of out_features) in training: LoRA nothing."""
        return combined

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.adapter_enabled:
            return out
        if not (torch.is_grad_enabled() or self.training or torch.compiler.is_compiling()):
            # Inference: a few kernels in place on W x, which is what decoding with unmerged adapters pays.
            a, folded_b, excess = self.folded_terms(out.dtype)
            flat = out.view(-1, out.shape[-1])
            if excess is not None:
                flat.addcmul_(flat, excess)
            flat.addmm_(F.linear(x.reshape(-1, x.shape[-1]).to(out.dtype), a), folded_b.t())
            return out
        dropped, rescale = adapter_dropout(x, self.dropout if self.training else 0.0)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the cast would be undone at once
            dropped = dropped.to(self.lora_A.dtype)
        hidden = F.linear(dropped, self.lora_A) * (self.scaling * rescale)
        # W x + s B A x in one kernel (addmm).
        combined = torch.addmm(out.view(-1, out.shape[-1]), hidden.view(-1, self.rank).to(out.dtype),
                               self.lora_B.t().to(out.dtype))
        return self.rescaled(combined).view(out.shape)

    def updated_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.dtype]:
        """Rows start:end of W + s B A in fp32, and W's dtype. A 4-bit base dequantizes only these rows."""
        base = self.base_layer
        rows = base.rows(start, end) if is_quantized(base) else base.weight[start:end]
        return rows.float() + self.scaling * (self.lora_B[start:end].float() @ self.lora_A.float()), rows.dtype

    @torch.no_grad()
    def merged_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows start:end of the merged weight, computed in fp32 and cast to W's dtype. Each row needs only
        itself, so a writer can merge a large layer a cache-sized block at a time instead of materialising it
        (the GGUF export does)."""
        combined, dtype = self.updated_rows(start, end)
        return combined.to(dtype)

    def merged_weight(self) -> torch.Tensor:
        """The whole merged weight, built from the same row blocks a streaming writer uses, so both give
        identical values."""
        rows, cols = self.base_layer.out_features, self.base_layer.in_features
        step = rows_per_block(cols)
        return torch.cat([self.merged_rows(start, start + step) for start in range(0, rows, step)])

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}" + (", rslora" if self.rslora else "")


@dataclass(frozen=True)
class AdapterSummary:
    layers: int
    trainable: int
    total: int
    kind: str = "DoRA"

    def __str__(self) -> str:
        return (f"{self.kind} on {self.layers} linears: trainable params {self.trainable:,} of {self.total:,} "
                f"({100 * self.trainable / self.total:.3f}%)")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every adapter layer of the model, LoRA or DoRA, with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_adapters(model: nn.Module) -> bool:
    return next(adapter_layers(model), None) is not None


def adapter_kind(model: nn.Module) -> str | None:
    """"LoRA" or "DoRA" (what the model's adapter layers are), None without any."""
    layer = next(adapter_layers(model), (None, None))[1]
    return None if layer is None else layer.kind


def summarize(model: nn.Module, layers: int | None = None) -> AdapterSummary:
    """The model's adapter in numbers: how many linears it wraps (counted when not given) and what trains."""
    params = list(model.parameters())
    layers = len(list(adapter_layers(model))) if layers is None else layers
    return AdapterSummary(layers, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params),
                          adapter_kind(model) or "no adapter")


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a list matches the last name component (or a dotted suffix); a string is a regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_seed(seed: int, name: str) -> int:
    """One layer's seed, from the run's seed and the layer's name: the same adapter comes out whatever order
    layers are wrapped in, and whatever else drew random numbers first."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def wrap_targets(model: nn.Module, layer_class: type[LoRALinear], rank: int, alpha: float, dropout: float,
                 targets, dtype: torch.dtype, seed: int, rslora: bool) -> AdapterSummary:
    """Wrap the linears `targets` names in `layer_class` and freeze everything else (apply_lora, apply_dora)."""
    model.requires_grad_(False)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and _matches(name, targets)]
    if not chosen:
        raise ValueError(f"no linear layer of the model matches target modules {targets!r}")
    if not isinstance(targets, str):
        unmatched = [t for t in targets if not any(_matches(name, [t]) for name, _ in chosen)]
        if unmatched:
            raise ValueError(f"target modules {unmatched} match no linear layer of the model")
    for name, linear in chosen:
        owner, _, attr = name.rpartition(".")
        layer = layer_class(linear, rank, alpha, dropout, dtype, layer_seed(seed, name), rslora)
        layer.train(linear.training)  # keep eval/train mode
        setattr(model.get_submodule(owner), attr, layer)
    return summarize(model, len(chosen))


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 32, dropout: float = 0.05,
               targets=DEFAULT_TARGETS, dtype: torch.dtype = torch.float32, seed: int = 0,
               rslora: bool = False) -> AdapterSummary:
    """Wrap the target linears in LoRALinear and freeze everything else. `seed` fixes the initial A matrices
    (B starts at zero); pass the run's seed (TrainConfig.seed) so one number governs the run."""
    return wrap_targets(model, LoRALinear, rank, alpha, dropout, targets, dtype, seed, rslora)


def initialise_adapters(model: nn.Module) -> None:
    """Start every adapter layer again from its own seed, as apply_lora / apply_dora started it, from the weights
    it holds now: for adapters attached to a model built on the meta device and filled afterwards."""
    for _, layer in adapter_layers(model):
        layer.reset_adapter()


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the model as its base (adapters bypassed exactly), e.g. for adapter-on/off comparisons."""
    layers = [layer for _, layer in adapter_layers(model)]
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer.adapter_enabled = state


QUANTIZED_BASE_MERGE = ("the model's base is 4-bit (base_quant 'nf4'): what ships is the adapter merged into the "
                        "base in its own precision; load the model folder with the adapter (stratos-lite merge or "
                        "export --model FOLDER --adapter ADAPTER; load_pretrained_with_adapter) and merge that")


def has_quantized_base(model: nn.Module) -> bool:
    """Whether an adapter of `model` sits on a 4-bit base (model/nf4.py), which merging would bake into the
    weights it ships."""
    return any(is_quantized(layer.base_layer) for _, layer in adapter_layers(model))


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter layer into a plain linear holding its merged weight: W + sBA for LoRA,
    m / ||W + sBA|| * (W + sBA) for DoRA."""
    if has_quantized_base(model):
        raise ValueError(QUANTIZED_BASE_MERGE)
    for name, layer in list(adapter_layers(model)):
        base = layer.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        merged.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, merged)
    return model
