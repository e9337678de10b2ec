"""Keep a CPU training process's resident memory close to the bytes its tensors hold.

glibc gives every thread that allocates its own heap ("arena"). The CPU kernels' worker threads allocate
scratch space in theirs, and memory freed there is neither reused by the main thread nor returned to the
system, so a step's peak RSS runs far above its live tensors: 0.69 GB against 0.27 GB of tensors for one
micro-batch of Qwen3-0.6B's shape (1 x 512, bf16, DoRA). With one arena it was 0.30 GB, also when the
limit was set after the model was built and a matmul had run. Fragmentation within the one heap remains:
a whole Trainer step still peaked 1.17-1.78x its live tensors (benchmarks/RESULTS.md, plan accuracy).
"""

from __future__ import annotations

import ctypes
import sys

M_ARENA_TEST, M_ARENA_MAX = -7, -8  # mallopt parameters (glibc's malloc.h)


def use_one_malloc_arena() -> bool:
    """Ask glibc for a single malloc arena; False where the C library is not glibc (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_TEST, 1)) and bool(libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # musl and others: no libc.so.6, or no mallopt
        return False
