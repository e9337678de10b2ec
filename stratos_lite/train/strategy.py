"""How a run spreads over processes, chosen once: one process, DDP or FSDP.

The loop asks the same things of every strategy, so it reads the same whatever the world size:

    forward(...)             the training forward (through DDP's wrapper where there is one)
    gradient_sync(last)      gradients are reduced across ranks on a step's last micro-batch only
    backward(loss)           DDP and FSDP average gradients over ranks; the loss is scaled by the world size
                             first, so the reduced gradient is the global sum the step's denominator expects
    sum_over_ranks(t)        the step's denominator and loss cover every rank's examples
    clip(params, max_norm)   the norm before clipping, over every rank's shards (the global norm)
    whole_state / restore    trainable tensors and optimizer state as whole tensors, whatever holds them,
                             so a checkpoint written by N ranks resumes on any number
    is_main                  only rank 0 writes files; every rank joins each collective
    any_rank(flag)           ranks stop together (a signal, a lock refused), so none waits in a collective
    max_over_ranks(n)        packed rows: every rank runs as many forwards as the rank with the most

Under torchrun the strategy is TrainConfig.strategy ("ddp" or "fsdp"), chosen by the builder (builder.py); a
single process is `OneProcess`.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from ..model.shards import local, whole
from .device import default_device
from .fsdp import gather_parameters, gather_state, gather_trainable, is_sharded, scatter_state, shard_model


def process_group_backend(device: torch.device) -> str:
    """The collective backend for a model on `device`: NCCL (RCCL on ROCm) for a GPU, gloo for the CPU, even on
    a host with GPUs (NCCL cannot reduce CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device | None = None) -> tuple[int, int]:
    """(this process's rank, world size): joins the process group when torchrun started this process and it
    has not joined yet, with the backend of the model's `device` (default: this rank's GPU, else the CPU),
    each GPU rank bound to its own device; else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = device or default_device()
        backend = process_group_backend(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exit_distributed() -> None:
    """The last call of a torchrun process: leave the process group with every rank, then end the process
    (status 0) without the interpreter's teardown; returns at once where no process group was joined.

    Tearing down frees what gloo's threads may still reference (FSDP's communication state, reachable only
    through reference cycles until then), and that can abort a process whose work is done with SIGABRT
    ("terminate called without an active exception"): it happened to this project's two-rank tests even
    after destroy_process_group. Output streams are flushed; files the caller wrote are closed already."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class OneProcess:
    """Everything local: nothing to wrap, reduce or gather."""

    def __init__(self, model: nn.Module, process_rank: int = 0, world_size: int = 1):
        self.model, self.process_rank, self.world_size = model, process_rank, world_size
        self.device = next(model.parameters()).device  # where the reductions' tensors live (NCCL: the GPU)

    @property
    def is_main(self) -> bool:
        return self.process_rank == 0

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def gradient_sync(self, last: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank: ranks decide together to stop, so none is left in a collective."""
        return flag

    def max_over_ranks(self, value: int) -> int:
        """The largest `value` of any rank (how many packed rows every rank runs, so all join each collective)."""
        return value

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a tensor (all of it unless sharded)."""
        return tensor

    def whole_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
        """(trainable tensors by name, the optimizer's index-keyed state_dict), whole; where sharded, a
        collective whose result is on rank 0."""
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}, \
            optimizer.state_dict()

    @torch.no_grad()
    def restore_state(self, optimizer: torch.optim.Optimizer, trainable: dict[str, torch.Tensor],
                      optimizer_state: dict) -> None:
        """The inverse of whole_state: every rank passes the same whole tensors."""
        params = dict(self.model.named_parameters())
        for name, tensor in trainable.items():
            params[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)

    def whole_trainable(self) -> dict[str, torch.Tensor] | None:
        """Whole trainable tensors for an adapter file, or None where the model's own tensors are whole."""
        return None

    def whole_parameters(self) -> dict[str, torch.Tensor] | None:
        """Every parameter whole, for a model folder, or None where the model's own tensors are whole."""
        return None

    def gather_to_main(self, value) -> list | None:
        """Every rank's `value`, in rank order, on rank 0 (None on the others)."""
        return [value]

    def barrier(self) -> None:
        pass


class AcrossRanks(OneProcess):
    """What DDP and FSDP share: reductions across ranks and a loss scaled so their gradient average is a sum."""

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.world_size).backward()

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        return bool(self.sum_over_ranks(torch.tensor(int(flag), device=self.device)) > 0)

    def max_over_ranks(self, value: int) -> int:
        largest = torch.tensor(value, device=self.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return int(largest)

    def gather_to_main(self, value) -> list | None:
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        dist.barrier()


class DataParallel(AcrossRanks):
    """DDP: a whole replica on every rank, gradients averaged across ranks in buckets during the backward."""

    def __init__(self, model: nn.Module, process_rank: int, world_size: int):
        super().__init__(model, process_rank, world_size)
        # Rank 0's weights and buffers are broadcast once, here. Not again before every forward: the buffers are
        # RoPE's tables and a 4-bit base's codes, which no step changes (the codes are an 8B model's 3.5 GB).
        self.wrapper = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)

    def forward(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)  # DDP prepares its gradient reduction in its forward

    def gradient_sync(self, last: bool):
        return nullcontext() if last else self.wrapper.no_sync()


class Sharded(AcrossRanks):
    """FSDP2 (fsdp.shard_model): every parameter, gradient and optimizer state split across ranks. The model
    comes sharded from the builder's prepare_model, which reads each rank's rows only; one a script built
    whole is sharded here."""

    def __init__(self, model: nn.Module, process_rank: int, world_size: int, cpu_offload: bool = False):
        super().__init__(model, process_rank, world_size)
        if not is_sharded(model):
            shard_model(model, cpu_offload=cpu_offload)  # parameters become sharded DTensors, in place

    def gradient_sync(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        return nullcontext()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return whole(super().clip(params, max_norm))

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return local(tensor)

    def whole_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
        return gather_state(self.model, optimizer)

    def restore_state(self, optimizer: torch.optim.Optimizer, trainable: dict[str, torch.Tensor],
                      optimizer_state: dict) -> None:
        scatter_state(self.model, optimizer, trainable, optimizer_state)

    def whole_trainable(self) -> dict[str, torch.Tensor]:
        return gather_trainable(self.model)

    def whole_parameters(self) -> dict[str, torch.Tensor]:
        return gather_parameters(self.model)
