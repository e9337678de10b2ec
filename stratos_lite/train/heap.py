"""Handing freed CPU memory back to the operating system during training (glibc's malloc_trim).

PyTorch's CPU tensors live in glibc's heap. A tensor freed below one still alive (a layer's temporaries
under the layer input that checkpointing keeps) cannot be returned by glibc on its own, so a step's
resident memory drifts above the bytes its tensors hold, and above the plan's live peak. malloc_trim(0)
returns every whole free page in the heap. Where it is called decides the trade, and the price is faulting
the pages in again. At the boundaries of a step (each micro-batch's forward and backward, the optimizer step)
it takes back part of the gap; every few decoder layers it holds the peak near the live bytes. Short steps
pay most for the faults, hence off by default.

On a libc without malloc_trim (macOS, musl) every call here does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable
from contextlib import contextmanager

from torch import nn


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (a few milliseconds; pages are faulted in again on reuse)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextmanager
def released_every(layers: Iterable[nn.Module], every: int):
    """Within the block, release free memory before every `every`-th call of any of `layers` (forward and
    checkpoint recomputation alike); `every` <= 0 installs nothing."""
    calls = 0

    def before_layer(module, args):
        nonlocal calls
        calls += 1
        if calls % every == 0:
            release_free_memory()

    handles = [layer.register_forward_pre_hook(before_layer) for layer in layers] if every > 0 else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
