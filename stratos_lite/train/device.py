"""What a run's settings resolve to on a device: the compute dtype ("auto": bf16 where the device computes it
natively), this process's default device, the attention kernel's context and PyTorch's deterministic
algorithms."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware: GPUs that support bf16 natively (not emulated:
    pre-Ampere NVIDIA cards emulate it), and CPUs with AVX512-BF16 or AMX (what oneDNN checks). On other
    CPUs bf16 is emulated, many times slower than fp32."""
    if device.type == "cuda":  # the current device: each rank has set its own
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype TrainConfig.dtype asks for on `device` ("auto": bf16 where native, else fp32)."""
    if setting == "auto":
        return torch.bfloat16 if bf16_is_native(device) else torch.float32
    return getattr(torch, setting)


def attention_kernel(setting: str):
    """The context a training forward and backward run under for TrainConfig.attention_kernel. The backward
    runs under it too: gradient checkpointing recomputes forwards there."""
    return sdpa_kernel(SDPBackend.MATH) if setting == "math" else nullcontext()


@contextmanager
def deterministic_algorithms(wanted: bool):
    """PyTorch's deterministic algorithms for the block when `wanted` (TrainConfig.deterministic), as before after."""
    if not wanted:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's own condition for repeatable results
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def default_device() -> torch.device:
    """This process's GPU when there is one (ROCm builds answer to "cuda" too), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def determinism_gap(wanted: bool, attention: str, device: torch.device) -> str | None:
    """What deterministic = true cannot make repeatable on `device`, or None. On ROCm, AOTriton's fused attention
    backward ignores PyTorch's deterministic mode, so attention must run on the math kernel for a bitwise rerun."""
    if wanted and torch.version.hip and device.type == "cuda" and attention != "math":
        return ("deterministic = true on ROCm: AOTriton's fused attention backward is not deterministic; "
                "attention_kernel = 'math' makes the run repeatable bit for bit (at the math kernel's memory)")
    return None
