"""DoRA (weight-decomposed low-rank adaptation) as one small module (its PEFT files: peft_files.py).

    y = (m / n) * (W x + s * B A drop(x)),   n = ||W + s B A|| per output row, detached (DoRA paper, 4.3)

computed in bf16 as c + c * (m / n - 1) with c = W x + s B A drop(x), so that small magnitude changes survive.

Dropout touches only the adapter path, so a training step runs one base matmul (PEFT runs two when dropout
is on). n is computed in closed form from rank-sized products and cached until A, B or W change, so
decoding with unmerged adapters costs about what LoRA costs.
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


def row_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W||^2 of each row in fp32, without an fp32 copy of W (the magnitude starts at its square root)."""
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=torch.float32).square()


def initial_lora_A(rank: int, in_features: int, dtype: torch.dtype = torch.float32,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A as PEFT initialises it (Kaiming-uniform), drawn on the CPU, so one generator gives the same A on
    every device and every rank."""
    lora_A = torch.empty(rank, in_features, dtype=dtype)
    return nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)


@torch.no_grad()
def initialise_adapter(layer: DoRALinear, generator: torch.Generator | None) -> None:
    """DoRA's starting point, as PEFT's: A Kaiming-uniform from `generator`, B zero (so the layer starts as
    its base), and the magnitude the norm of each row of W. A layer FSDP shards takes its own rows, the
    magnitude computed where each row of W lives."""
    lora_A = initial_lora_A(layer.rank, layer.base_layer.in_features, layer.lora_A.dtype, generator)
    weight = local(layer.base_layer.weight)
    copy_whole_into(layer.lora_A, lora_A)
    local(layer.lora_B).zero_()
    local(layer.lora_magnitude).copy_(row_norm_sq(weight).sqrt())


class DoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        if base_layer.bias is not None:
            raise ValueError("DoRALinear wraps bias-free linears (Qwen3 has no biases)")
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, rank, dtype=dtype, device=weight.device))
        self.lora_magnitude = nn.Parameter(torch.empty(base_layer.out_features, dtype=dtype, device=weight.device))
        self._cache: dict[str, tuple[tuple, object]] = {}
        self.held_norm: torch.Tensor | None = None  # n for a compiled layer, set before it runs (hold_norms)
        initialise_adapter(self, generator)
        self.dropout = float(dropout)
        self.adapter_enabled = True

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
        """Drop what is cached from A and B (not ||W||), as an optimizer step makes it stale: the next
        forward recomputes it, as the first forward of every training step does."""
        self._cache = {name: hit for name, hit in self._cache.items() if name == "base_norm_sq"}

    def _base_row_norm_sq(self) -> torch.Tensor:
        """||W||^2 per row, cached: the frozen W rarely changes."""
        weight = self.base_layer.weight
        return self._cached("base_norm_sq", (weight,), lambda: row_norm_sq(weight))

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ||W + s B A|| per output row (fp32, detached), recomputed only when W, A or B changed:
        ||W||^2 + 2 s rowsum((W A^T) * B) + s^2 rowsum((B A A^T) * B).

        Inside a compiled layer it is the norm hold_norms computed before the forward: the cache's checks of
        version counters and addresses would break the compiled graph at every adapter."""
        if torch.compiler.is_compiling():
            return self.held_norm

        def compute():
            with torch.autocast(self.lora_A.device.type, enabled=False):
                weight, a, b, s = self.base_layer.weight, self.lora_A.float(), self.lora_B.float(), self.scaling
                w_at = F.linear(a.to(weight.dtype), weight).float().t()  # (out, r): one pass over W
                cross = (w_at * b).sum(dim=1)
                lora_sq = ((b @ (a @ a.t())) * b).sum(dim=1)
                return (self._base_row_norm_sq() + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()

        return self._cached("norm", (self.base_layer.weight, self.lora_A, self.lora_B), compute)

    def magnitude_excess(self) -> torch.Tensor:
        """m / n - 1 per output row, in fp32.

        The rescale is applied as y + y * (m / n - 1), never as y * (m / n) with m / n in bf16: near 1 bf16
        steps by 2^-8 below and 2^-7 above, so m / n rounded there hides every magnitude change under ~0.4 %,
        which at lr 1e-5 is most of what the magnitude learns. The difference, formed in fp32, keeps them."""
        return self.lora_magnitude / self.weight_norm() - 1

    @torch.no_grad()
    def folded_terms(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A, (m/n) s B and m/n - 1 in `dtype`, cached, for inference: y = W x + (m/n - 1) W x + ((m/n) s B) (A x)."""
        def compute():
            excess = self.magnitude_excess().float()
            folded_b = (excess + 1)[:, None] * self.scaling * self.lora_B.float()
            return self.lora_A.to(dtype), folded_b.to(dtype), excess.to(dtype)

        tensors = (self.base_layer.weight, self.lora_A, self.lora_B, self.lora_magnitude)
        return self._cached("folded", tensors, compute, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.adapter_enabled:
            return out
        if not (torch.is_grad_enabled() or self.training or torch.compiler.is_compiling()):
            # Inference: four kernels instead of eleven, which is what decoding with unmerged adapters pays.
            a, folded_b, excess = self.folded_terms(out.dtype)
            flat = out.view(-1, out.shape[-1])
            flat.addcmul_(flat, excess).addmm_(F.linear(x.reshape(-1, x.shape[-1]).to(out.dtype), a), folded_b.t())
            return out
        dropped, rescale = adapter_dropout(x, self.dropout if self.training else 0.0)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the cast would be undone at once
            dropped = dropped.to(self.lora_A.dtype)
        hidden = F.linear(dropped, self.lora_A) * (self.scaling * rescale)
        # W x + s B A x in one kernel (addmm), then the per-row rescale: the only extra pass DoRA adds to LoRA.
        combined = torch.addmm(out.view(-1, out.shape[-1]), hidden.view(-1, self.rank).to(out.dtype),
                               self.lora_B.t().to(out.dtype))
        if out.dtype == torch.float32:  # fp32 carries m / n whole: the plain product, as it always was
            return (combined * (self.lora_magnitude / self.weight_norm())).view(out.shape)
        return torch.addcmul(combined, combined, self.magnitude_excess().to(out.dtype)).view(out.shape)

    @torch.no_grad()
    def merged_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows start:end of the merged weight m / ||W + s B A|| * (W + s B A), computed in fp32 and cast to
        W's dtype. Each row needs only itself, so a writer can merge a large layer a cache-sized block at a
        time instead of materialising it (the GGUF export does)."""
        weight = self.base_layer.weight
        combined = weight[start:end].float() + self.scaling * (self.lora_B[start:end].float() @ self.lora_A.float())
        scale = self.lora_magnitude[start:end].float()[:, None] / torch.linalg.vector_norm(combined, dim=1,
                                                                                          keepdim=True)
        return combined.mul_(scale).to(weight.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The whole merged weight, built from the same row blocks a streaming writer uses, so both give
        identical values."""
        rows, cols = self.base_layer.weight.shape
        step = rows_per_block(cols)
        return torch.cat([self.merged_rows(start, start + step) for start in range(0, rows, step)])

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"


@dataclass(frozen=True)
class AdapterSummary:
    layers: int
    trainable: int
    total: int

    def __str__(self) -> str:
        return (f"DoRA on {self.layers} linears: trainable params {self.trainable:,} of {self.total:,} "
                f"({100 * self.trainable / self.total:.3f}%)")


def summarize(model: nn.Module, layers: int | None = None) -> AdapterSummary:
    """The model's adapter in numbers: how many linears it wraps (counted when not given) and what trains."""
    params = list(model.parameters())
    layers = len(list(dora_layers(model))) if layers is None else layers
    return AdapterSummary(layers, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def dora_layers(model: nn.Module) -> Iterator[tuple[str, DoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, DoRALinear):
            yield name, module


def has_dora(model: nn.Module) -> bool:
    return next(dora_layers(model), None) is not None


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a list matches the last name component (or a dotted suffix); a string is a regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one layer's initialisation, from the run's seed and the layer's name: the same
    adapter comes out whatever order layers are wrapped in, and whatever else drew random numbers first."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def apply_dora(model: nn.Module, rank: int = 16, alpha: float = 32, dropout: float = 0.05,
               targets=DEFAULT_TARGETS, dtype: torch.dtype = torch.float32, seed: int = 0) -> AdapterSummary:
    """Wrap the target linears in DoRALinear and freeze everything else. `seed` fixes the initial A
    matrices (B starts at zero); pass the run's seed (TrainConfig.seed) so one number governs the run."""
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
        layer = DoRALinear(linear, rank, alpha, dropout, dtype, layer_generator(seed, name))
        layer.train(linear.training)  # keep eval/train mode
        setattr(model.get_submodule(owner), attr, layer)
    return summarize(model, len(chosen))


def initialise_adapters(model: nn.Module, seed: int) -> None:
    """Start every DoRA layer again as apply_dora(..., seed=seed) starts it, from the weights it holds now: for
    adapters attached to a model built on the meta device and filled afterwards."""
    for name, layer in dora_layers(model):
        generator = layer_generator(seed, name)
        initialise_adapter(layer, generator)


def hold_norms(model: nn.Module, *_) -> None:
    """Set every DoRA layer's held_norm to its current norm (computed or taken from the cache), for compiled
    layers to read as an input. Usable as a forward pre-hook on the model: each forward then holds the norms
    of the weights it runs with, which costs a cache check per layer while the weights are unchanged."""
    for _, layer in dora_layers(model):
        layer.held_norm = layer.weight_norm()


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the model as its base (adapters bypassed exactly), e.g. for adapter-on/off comparisons."""
    layers = [layer for _, layer in dora_layers(model)]
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer.adapter_enabled = state


@torch.no_grad()
def merge_dora(model: nn.Module) -> nn.Module:
    """Fold every DoRA layer into a plain linear holding m / ||W + sBA|| * (W + sBA)."""
    for name, layer in list(dora_layers(model)):
        base = layer.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        merged.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, merged)
    return model
