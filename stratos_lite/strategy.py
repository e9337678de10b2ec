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

Under torchrun the strategy is TrainConfig.strategy ("ddp" or "fsdp"); a single process is `OneProcess`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig
from .distributed import (
    gather_parameters,
    gather_state,
    gather_trainable,
    init_distributed,
    is_sharded,
    local,
    scatter_state,
    shard_model,
    whole,
)


class OneProcess:
    """Everything local: nothing to wrap, reduce or gather."""

    def __init__(self, model: nn.Module, rank: int = 0, world_size: int = 1):
        self.model, self.rank, self.world_size = model, rank, world_size
        self.device = next(model.parameters()).device  # where the reductions' tensors live (NCCL: the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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

    def __init__(self, model: nn.Module, rank: int, world_size: int):
        super().__init__(model, rank, world_size)
        self.wrapper = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights

    def forward(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)  # DDP prepares its gradient reduction in its forward

    def gradient_sync(self, last: bool):
        return nullcontext() if last else self.wrapper.no_sync()


class Sharded(AcrossRanks):
    """FSDP2 (distributed.shard_model): every parameter, gradient and optimizer state split across ranks."""

    def __init__(self, model: nn.Module, rank: int, world_size: int, cpu_offload: bool = False):
        super().__init__(model, rank, world_size)
        if not is_sharded(model):  # run.py loads an FSDP run sharded from the start (distributed.load_sharded)
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


def strategy_for(model: nn.Module, config: TrainConfig) -> OneProcess:
    """The strategy of this process: joins torchrun's process group when there is one, then wraps or shards
    `model` as config.strategy says."""
    rank, world_size = init_distributed(next(model.parameters()).device)
    if world_size == 1:
        return OneProcess(model)
    if config.strategy == "fsdp":
        return Sharded(model, rank, world_size, cpu_offload=config.cpu_offload)
    return DataParallel(model, rank, world_size)
