"""TrainConfig.compile: torch.compile of each decoder layer, in place.

Each layer is compiled on its own (module.compile keeps parameter names, so checkpoints and adapters are
unchanged), with dynamic shapes, so batches of new lengths reuse one graph instead of compiling again. DoRA's
norm n = ||W + s B A|| is computed outside the compiled region, once per forward from the adapters' cache
(dora.hold_norms as a pre-hook), and enters the graph as an input: the cache's bookkeeping would otherwise
break the graph at every adapter. Packed rows' per-example attention also runs outside it (below), since
each step's example lengths differ.
"""

from __future__ import annotations

from torch import nn

from .dora import hold_norms


def compile_layers(model: nn.Module, **options) -> None:
    """Compile every decoder layer of a Qwen3ForCausalLM in place (the first steps pay the compilation); a
    second call does nothing. `options` are torch.compile's (mode, backend, ...). Decoding with a KV cache runs
    the layers eagerly (Qwen3Model.hidden_states)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"compile = true compiles a Qwen3ForCausalLM's decoder layers; {type(model).__name__} "
                         "has none")
    if getattr(model, "layers_compiled", False):
        return
    options.setdefault("dynamic", True)
    for layer in layers:
        layer.compile(**options)
    model.register_forward_pre_hook(hold_norms)  # also when adapters come after compiling (no-op without them)
    model.layers_compiled = True
