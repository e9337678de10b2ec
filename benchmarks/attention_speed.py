"""Which attention kernel trains faster on this machine: PyTorch's fused SDPA (on a CPU, its flash kernel)
or the math kernel (matmul, softmax, matmul), for TrainConfig.attention_kernel.

    python benchmarks/attention_speed.py [--steps 60] [--rounds 2]

Part 1: one attention call, forward + backward, at the demo's head shape (batch 8, 4 query heads over 2
key/value heads, head_dim 64, causal) over a sweep of sequence lengths, in bf16 and fp32.
Part 2: the demo's base phase (stratos_lite/demo.toml) through the Trainer with each setting, in dtype "auto"
(bf16 where native) and float32: the median step time over all rounds, the first step of each run left out.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from dtype_speed import demo_base_phase
from heap_release_speed import step_seconds
from timing import median_seconds
from torch.nn.attention import SDPBackend, sdpa_kernel

LENGTHS = (64, 128, 160, 192, 256, 384, 512, 1024)
KERNELS = {"sdpa": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def call_seconds(kernel: SDPBackend, length: int, dtype: torch.dtype) -> float:
    q = torch.randn(8, 4, length, 64, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(8, 2, length, 64, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)

    def forward_backward():
        with sdpa_kernel(kernel):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad)

    return median_seconds(forward_backward, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("one attention call, forward + backward, ms (sdpa / math):")
    for dtype in (torch.bfloat16, torch.float32):
        cells = []
        for length in LENGTHS:
            sdpa, math = (1e3 * call_seconds(KERNELS[name], length, dtype) for name in ("sdpa", "math"))
            cells.append(f"{length}: {sdpa:.1f}/{math:.1f} ({math / sdpa:.2f}x)")
        print(f"  {str(dtype).removeprefix('torch.'):>8}  " + ", ".join(cells))
    demo, tokenizer, data = demo_base_phase()
    for dtype in ("auto", "float32"):
        times: dict[str, list[float]] = {name: [] for name in KERNELS}
        for _ in range(args.rounds):
            for name in KERNELS:
                demo.base = {**demo.base, "attention_kernel": name, "dtype": dtype}
                times[name] += step_seconds(demo, tokenizer, data, "off", args.steps)
        sdpa = statistics.median(times["sdpa"])
        print(f"demo base phase, dtype {dtype}, {args.steps} steps x {args.rounds} rounds:")
        for name in KERNELS:
            median = statistics.median(times[name])
            print(f"  attention_kernel {name:>4}: {median:.4f} s/step ({median / sdpa:.2f}x sdpa)")


if __name__ == "__main__":
    main()
