"""DoRA (weight-decomposed low-rank adaptation): LoRA (lora.py) plus a trained magnitude per output row.

    y = (m / n) * (W x + s * B A drop(x)),   n = ||W + s B A|| per output row, detached (DoRA paper, 4.3)

computed in bf16 as c + c * (m / n - 1) with c = W x + s B A drop(x), so that small magnitude changes survive.

As for LoRA, dropout touches only the adapter path, so a training step runs one base matmul (PEFT runs two
when dropout is on). n is computed in closed form from rank-sized products and cached until A, B or W change,
so decoding with unmerged adapters costs about what LoRA costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import DEFAULT_TARGETS, AdapterSummary, LoRALinear, adapter_layers, merge_adapters, wrap_targets
from .shards import local


def row_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W||^2 of each row in fp32, without an fp32 copy of W (the magnitude starts at its square root)."""
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=torch.float32).square()


class DoRALinear(LoRALinear):
    kind = "DoRA"

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, seed: int | None = None, rslora: bool = False):
        super().__init__(base_layer, rank, alpha, dropout, dtype, seed, rslora)
        self.held_norm: torch.Tensor | None = None  # n for a compiled layer, set before it runs (hold_norms)

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().adapter_shapes(), "lora_magnitude": (self.base_layer.out_features,)}

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """LoRA's start, and the magnitude the norm of each row of W (so the layer starts as its base), computed
        where each row of W lives when FSDP shards the layer."""
        super().reset_adapter()
        local(self.lora_magnitude).copy_(row_norm_sq(local(self.base_layer.weight)).sqrt())

    def _base_row_norm_sq(self, weight: torch.Tensor) -> torch.Tensor:
        """||W||^2 per row, cached: the frozen W rarely changes."""
        return self._cached("base_norm_sq", (self._base_state(),), lambda: row_norm_sq(weight))

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
                return (self._base_row_norm_sq(weight) + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()

        return self._cached("norm", (self._base_state(), self.lora_A, self.lora_B), compute)

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

        tensors = (self._base_state(), self.lora_A, self.lora_B, self.lora_magnitude)
        return self._cached("folded", tensors, compute, dtype)

    def rescaled(self, combined: torch.Tensor) -> torch.Tensor:
        """The per-row rescale m / n: the only extra pass DoRA adds to LoRA."""
        if combined.dtype == torch.float32:  # fp32 carries m / n whole: the plain product, as it always was
            return combined * (self.lora_magnitude / self.weight_norm())
        return torch.addcmul(combined, combined, self.magnitude_excess().to(combined.dtype))

    @torch.no_grad()
    def merged_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows start:end of m / ||W + s B A|| * (W + s B A), computed in fp32 and cast to W's dtype."""
        combined, dtype = self.updated_rows(start, end)
        scale = self.lora_magnitude[start:end].float()[:, None] / torch.linalg.vector_norm(combined, dim=1,
                                                                                          keepdim=True)
        return combined.mul_(scale).to(dtype)


def apply_dora(model: nn.Module, rank: int = 16, alpha: float = 32, dropout: float = 0.05,
               targets=DEFAULT_TARGETS, dtype: torch.dtype = torch.float32, seed: int = 0,
               rslora: bool = False) -> AdapterSummary:
    """Wrap the target linears in DoRALinear and freeze everything else. `seed` fixes the initial A
    matrices (B starts at zero); pass the run's seed (TrainConfig.seed) so one number governs the run."""
    return wrap_targets(model, DoRALinear, rank, alpha, dropout, targets, dtype, seed, rslora)


def dora_layers(model: nn.Module):
    """The model's DoRA layers (those with a magnitude and a norm to hold), with their module names."""
    return ((name, layer) for name, layer in adapter_layers(model) if isinstance(layer, DoRALinear))


def hold_norms(model: nn.Module, *_) -> None:
    """Set every DoRA layer's held_norm to its current norm (computed or taken from the cache), for compiled
    layers to read as an input. Usable as a forward pre-hook on the model: each forward then holds the norms
    of the weights it runs with, which costs a cache check per layer while the weights are unchanged."""
    for _, layer in dora_layers(model):
        layer.held_norm = layer.weight_norm()


merge_dora = merge_adapters  # the name this library first exported; it merges LoRA layers as well
