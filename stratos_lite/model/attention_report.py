"""Which kernel PyTorch's scaled_dot_product_attention gives a call on this device, and what decides it.

SDPA picks flash, memory-efficient, cuDNN or the plain math kernel per call, from the device, dtype,
shapes and mask, silently. On ROCm the fused kernels come from AOTriton, and on Navi31 (gfx1100) they are
experimental: without TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1 training runs on the math kernel, whose fp32
T x T scores cost memory and time, and with it the report's run hit NaN gradients. So a run says at start
which kernel its training call gets, with the versions that decide it, and the NaN diagnosis repeats it.
The kernel is read from the profiler's record of one small call with the model's attention shape.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .attention import attend

FUSED_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "efficient",
             "_scaled_dot_product_cudnn_attention": "cudnn", "_flash_attention_forward": "flash",
             "_efficient_attention_forward": "efficient"}


def kernel_of_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, backward: bool = False) -> str:
    """The kernel SDPA runs for attend(q, k, v, mask): flash, efficient, cudnn, or math when no fused op ran."""
    inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = attend(*inputs, mask, q.shape[1] != k.shape[1])
        if backward:
            out.float().sum().backward()
    names = [event.key.removeprefix("aten::") for event in profile.key_averages()]
    # e.g. _scaled_dot_product_flash_attention_for_cpu on a CPU
    return next((kernel for op, kernel in FUSED_OPS.items() for name in names if name.startswith(op)), "math")


def training_kernel(heads: int, kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                    tokens: int = 256) -> str:
    """The kernel of a causal training call (forward and backward) with this attention shape."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, head_dim, generator=gen).to(device, dtype)
    k, v = (torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    return kernel_of_call(q, k, v, None, backward=True)


def versions() -> str:
    """torch and the GPU stack's versions: CUDA, or HIP and AOTriton on ROCm."""
    parts = [f"torch {torch.__version__}"]
    if torch.version.hip:
        parts += [f"HIP {torch.version.hip}", f"AOTriton {aotriton_version()}"]
    elif torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    return ", ".join(parts)


def aotriton_version(library_folder: Path | None = None) -> str:
    """The AOTriton release a ROCm build of torch carries, read from its library's file name
    (libaotriton_v2.so.0.11.1 in torch/lib, beside its shorter links): torch has no call that reports it; "unknown"
    when none is found."""
    folder = library_folder or Path(torch.__file__).parent / "lib"
    versions = [path.name.split(".so.", 1)[1] for path in folder.glob("libaotriton*.so.*")]
    return max(versions, key=lambda version: (version.count("."), version)) if versions else "unknown"


def attention_line(model_config, device: torch.device, dtype: torch.dtype, setting: str = "sdpa") -> str:
    """One line for a run's start and its NaN diagnosis: the training call's kernel and the versions."""
    if setting == "math":
        return f"attention: the math kernel (attention_kernel = 'math'), {versions()}"
    kernel = training_kernel(model_config.num_attention_heads, model_config.num_key_value_heads,
                             model_config.head_dim, device, dtype)
    note = " (fp32 T x T scores: see the plan)" if kernel == "math" and device.type != "cpu" else ""
    return f"attention: SDPA runs the training call on the {kernel} kernel{note}, {versions()}"
