"""What a GPU holds beyond the live tensors: PyTorch's caching allocator's segments and the BLAS workspaces.

An out-of-memory error on a GPU comes when the caching allocator cannot reserve a new segment, so what
must fit is `torch.cuda.max_memory_reserved()`, not the bytes of the live tensors. The allocator
(c10/cuda/CUDACachingAllocator.cpp) rounds every request up to 512 bytes; serves requests of up to 1 MiB
from 2 MiB segments, larger ones below 10 MiB from 20 MiB segments, and larger still from a segment of
their own size rounded up to 2 MiB; keeps freed blocks for reuse (best fit among the cached blocks of the
pool, the rest split off when it is worth a block of its own), merges a freed block with its free
neighbours, and gives nothing back to the driver unless an allocation would otherwise fail. `CachingAllocator`
replays a sequence of allocations and frees by those rules and reports the most it reserved.

The BLAS libraries keep workspaces beside the tensors, allocated through the same allocator once per
handle and stream; their sizes are PyTorch's defaults (aten/src/ATen/cuda/CublasHandlePool.cpp), or what
CUBLAS_WORKSPACE_CONFIG / CUBLASLT_WORKSPACE_SIZE (HIPBLASLT_WORKSPACE_SIZE on ROCm) ask for.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field

import torch

KiB, MiB = 1 << 10, 1 << 20
MIN_BLOCK = 512
SMALL_REQUEST = 1 * MiB  # at most this: the small pool
SMALL_SEGMENT = 2 * MiB
LARGE_SEGMENT = 20 * MiB  # for requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MiB
LARGE_ROUND = 2 * MiB


def round_request(size: int) -> int:
    return max(MIN_BLOCK, -(-size // MIN_BLOCK) * MIN_BLOCK)


def segment_size(request: int) -> int:
    if request <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if request < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-request // LARGE_ROUND) * LARGE_ROUND


@dataclass(eq=False)
class _Block:
    """A block of a segment; `prev` and `next` are its neighbours in address order (None at the ends), so a
    freed block finds the ones it merges with without a search, as the allocator's own blocks do."""
    segment: int
    offset: int
    size: int
    free: bool = True
    prev: _Block | None = field(default=None, repr=False)
    next: _Block | None = field(default=None, repr=False)


class CachingAllocator:
    """The caching allocator's bookkeeping for one stream, without the memory: `allocate` returns a handle,
    `free` takes it back; `reserved` and `peak_reserved` are the segments' bytes now and at most."""

    def __init__(self):
        self.reserved = self.peak_reserved = 0
        self._small: list[bool] = []  # whether each segment serves the small pool
        self._pools: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # small? -> (size, seg, off)
        self._cached: dict[tuple[int, int], _Block] = {}  # the pools' blocks by (segment, offset)

    def allocate(self, size: int) -> _Block:
        request = round_request(size)
        small = request <= SMALL_REQUEST
        pool = self._pools[small]
        found = bisect.bisect_left(pool, (request, -1, -1))  # best fit: the smallest cached block that holds it
        if found < len(pool):
            _, segment, offset = pool.pop(found)
            block = self._cached.pop((segment, offset))
        else:
            block = self._new_segment(segment_size(request), small)
        block.free = False
        remaining = block.size - request
        if remaining >= MIN_BLOCK if small else remaining > SMALL_REQUEST:
            self._split(block, request, small)
        return block

    def free(self, block: _Block) -> None:
        block.free = True
        small = self._small[block.segment]
        for neighbour in (block.next, block.prev):  # merged into one free block with each free neighbour
            if neighbour is not None and neighbour.free:
                self._unpool(neighbour, small)
                first, second = (block, neighbour) if block.offset < neighbour.offset else (neighbour, block)
                first.size += second.size
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                block = first
        self._pool(block, small)

    def _new_segment(self, size: int, small: bool) -> _Block:
        block = _Block(len(self._small), 0, size)
        self._small.append(small)
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _split(self, block: _Block, request: int, small: bool) -> None:
        rest = _Block(block.segment, block.offset + request, block.size - request, prev=block, next=block.next)
        if block.next is not None:
            block.next.prev = rest
        block.next, block.size = rest, request
        self._pool(rest, small)

    def _pool(self, block: _Block, small: bool) -> None:
        bisect.insort(self._pools[small], (block.size, block.segment, block.offset))
        self._cached[block.segment, block.offset] = block

    def _unpool(self, block: _Block, small: bool) -> None:
        pool = self._pools[small]
        del pool[bisect.bisect_left(pool, (block.size, block.segment, block.offset))]
        del self._cached[block.segment, block.offset]


def workspace_config(value: str | None, default: int) -> int:
    """CUBLAS_WORKSPACE_CONFIG's ":SIZE:COUNT" pairs (SIZE in KiB) as bytes, or `default` when unset."""
    if not value:
        return default
    pairs = re.findall(r":(\d+):(\d+)", value)
    return sum(int(size) * KiB * int(count) for size, count in pairs) or default


def blas_workspace(device: torch.device) -> int:
    """Bytes of BLAS workspace PyTorch keeps on `device` for one stream (0 off a CUDA/ROCm GPU): the cuBLAS
    (hipBLAS) handle's and the cuBLASLt (hipBLASLt) one's."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    properties = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        architecture = getattr(properties, "gcnArchName", "")
        blas_default = (128 if architecture.startswith(("gfx94", "gfx95")) else 32) * MiB
        blas = workspace_config(os.environ.get("CUBLAS_WORKSPACE_CONFIG")
                                 or os.environ.get("HIPBLAS_WORKSPACE_CONFIG"), blas_default)
        lt = os.environ.get("CUBLASLT_WORKSPACE_SIZE") or os.environ.get("HIPBLASLT_WORKSPACE_SIZE")
        return blas + int(lt or 76 * KiB) * KiB
    blas_default = 32 * MiB if properties.major >= 9 else 2 * 4096 * KiB + 8 * 16 * KiB  # ":4096:2:16:8"
    blas = workspace_config(os.environ.get("CUBLAS_WORKSPACE_CONFIG"), blas_default)
    return blas + int(os.environ.get("CUBLASLT_WORKSPACE_SIZE") or KiB) * KiB
