"""Parameters that FSDP2 shards, read and written as whole tensors.

A sharded parameter is a DTensor: each rank holds a block of its rows (dim 0, split as torch.chunk splits it).
Loading a model folder into one, or starting an adapter on one, writes each rank's rows of the whole value;
the rest of the model code sees plain tensors. Nothing here communicates.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (all of it when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as one piece: a DTensor gathered from its shards (a collective), anything else as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def copy_whole_into(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Set a parameter from its whole value: a sharded one takes only this rank's rows, so no rank ever holds
    more than the one whole tensor it is given."""
    if not isinstance(param, DTensor):
        param.copy_(tensor)
        return
    mesh = param.device_mesh
    rows = tensor.chunk(mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    param.to_local().copy_(rows[rank] if rank < len(rows) else tensor[:0])
