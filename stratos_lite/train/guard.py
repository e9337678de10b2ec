"""The NaN guard: a step whose loss or gradient norm is not finite never reaches the weights, and the run
stops with a diagnosis instead of training on garbage.

The report lost 7 hours to NaN gradients caused by an environment flag. So the diagnosis names what a person
would look for first: the first parameter whose gradient holds a NaN or Inf, the first module (in execution
order) whose output went non-finite when the step's micro-batches are run forward again, and the environment
flags known to cause it (also warned about when a run starts).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

# Environment flags known to produce NaN gradients (the report lost 7 hours to the first one).
RISKY_ENV_FLAGS = {
    "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "experimental AOTriton attention kernels on ROCm: their backward "
    "gave NaN gradients with DoRA + gradient checkpointing + bf16 on Navi31 (ROCm 6.2)",
}


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient norm; the message holds the diagnosis."""


def risky_flags() -> list[str]:
    """The risky flags set in this environment, each as `NAME=value (why)`."""
    return [f"{name}={os.environ[name]} ({why})" for name, why in RISKY_ENV_FLAGS.items()
            if os.environ.get(name, "0") not in ("", "0")]


def first_nonfinite_gradient(model: nn.Module, params: Iterable[torch.Tensor],
                             local: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """The name of the first trainable parameter whose gradient (this rank's part of it) is not finite."""
    names = {id(p): n for n, p in model.named_parameters()}
    return next((names[id(p)] for p in params if p.grad is not None and not torch.isfinite(local(p.grad)).all()),
                None)


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, run_forwards: Callable[[], None]) -> str | None:
    """Hooks on every module while `run_forwards` runs the step's micro-batches forward again: the first
    module (in execution order) whose output holds a NaN or Inf is where the trouble starts."""
    found: list[str] = []

    def hook(name):
        def check(module, args, output):
            if not found and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        run_forwards()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def diagnosis(step: int, loss: float, grad_norm: float, bad_parameter: str | None, bad_module: str | None,
              attention: str | None = None) -> str:
    """The guard's report of a non-finite step, one finding a line (`attention`: sdpa_report's line)."""
    lines = [f"step {step}: loss {loss}, gradient norm {grad_norm}; the update was not applied."]
    if bad_parameter is not None:
        lines.append(f"first parameter with a non-finite gradient: {bad_parameter}")
    lines.append(f"first module whose output went non-finite: {bad_module}" if bad_module else
                 "no module output was non-finite when the step's micro-batches were re-run forward")
    flags = risky_flags()
    lines.append("environment flags known to cause this: " + ("; ".join(flags) if flags else "none set"))
    if attention:
        lines.append(attention)
    return "\n".join(lines)
