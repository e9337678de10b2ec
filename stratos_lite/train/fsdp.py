"""Sharding with FSDP2 and the training state as whole tensors, whatever holds it.

With `strategy = "fsdp"` each decoder layer and then the root are `fully_shard`ed: every rank keeps 1/N
of each parameter (the frozen base and DoRA's tensors alike) and all-gathers a layer's parameters just
before it runs. So DoRA's norm ||W + s B A|| is computed on whole rows of W: inside a layer's forward and
its recomputation, W, A and B are the unsharded tensors, and no reduction across ranks is needed.

Mixed precision as in one process: parameters keep their own dtypes (the frozen base in bf16, adapters and
fully trained weights in fp32), autocast computes in bf16, and gradients are reduced in fp32.

Checkpoints hold whole tensors (gathered with torch.distributed.checkpoint's state-dict functions and
written by rank 0), the same files a one-process run writes, so any number of ranks resumes them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard


def shard_model(model: nn.Module, cpu_offload: bool = False, device: torch.device | None = None) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm_head), in place. A model built
    on the meta device is then made on `device`, empty: this rank's rows of each parameter, ready to be
    filled (model/folders.py's load_weights writes each rank's rows)."""
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else None
    options = {"mp_policy": policy, **({"offload_policy": offload} if offload else {})}
    for layer in model.model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    if device is not None:
        model.to_empty(device=device)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters in the optimizer's order (the Trainer builds it in this order)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


_WHOLE_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's trainable tensors by name, whole on rank 0 (a collective: every rank calls it)."""
    return get_model_state_dict(model, options=_WHOLE_ON_RANK0)


def gather_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a sharded model by name (frozen ones too), whole on rank 0 (a collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable tensors by name, the optimizer's state_dict in torch's own index-keyed form) of a sharded
    model, whole on rank 0 (a collective): the same values a one-process run saves."""
    trainable = gather_trainable(model)
    by_name = get_optimizer_state_dict(model, optimizer, options=_WHOLE_ON_RANK0)
    index = {name: i for i, name in enumerate(trainable_names(model))}
    return trainable, {"state": {index[name]: value for name, value in by_name.get("state", {}).items()},
                       "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                        for group in by_name.get("param_groups", [])]}


@torch.no_grad()
def scatter_state(model: nn.Module, optimizer: torch.optim.Optimizer, trainable: dict[str, torch.Tensor],
                  optimizer_state: dict) -> None:
    """Put whole trainable tensors and an index-keyed optimizer state into a sharded model and its optimizer,
    each rank keeping its rows (every rank calls it with the same whole tensors)."""
    set_model_state_dict(model, trainable, options=StateDictOptions(full_state_dict=True, strict=False))
    names = trainable_names(model)
    by_name = {"state": {names[i]: value for i, value in optimizer_state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
