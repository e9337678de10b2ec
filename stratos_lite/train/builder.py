"""The training model, decided in one place: what a TrainConfig trains, and how it is held.

    prepare_model(config)       config.model's folder loaded as the run trains it:
                                  dtype      the frozen base in the compute dtype; weights that train in fp32
                                  adapter    DoRA on config.targets (mode "dora"), or every weight (mode "full")
                                  layout     one process, DDP, or FSDP: sharded before any weight is read
                                  settings   gradient checkpointing (its policy) and compile
    prepare_model(config, weights=False)
                                the same model built from config.json alone, under whatever tensor mode the
                                caller is in: the plan's fake-tensor model is this one
    ready_for_training(model, config)
                                the settings and the strategy of this process (Trainer calls it), for a model
                                from prepare_model or one a script built itself

Everything that trains goes through here, the plan's simulation included, so the plan predicts the model that
runs. The strategy is chosen by `uses_fsdp` alone.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..config import TrainConfig
from ..model.compiling import compile_layers
from ..model.dora import apply_dora
from ..model.folders import load_model
from ..model.qwen3 import Qwen3Config, Qwen3ForCausalLM
from .device import compute_dtype, default_device
from .fsdp import fill_shards, is_sharded, shard_model
from .strategy import DataParallel, OneProcess, Sharded, init_distributed


def weights_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """What the model's weights are stored in: a frozen base in the compute dtype (bf16 where the device
    computes it), weights that train (mode "full") in fp32, which AdamW's small updates need."""
    return compute_dtype(config.dtype, device) if config.mode == "dora" else torch.float32


def uses_fsdp(config: TrainConfig, world_size: int) -> bool:
    """Whether the run shards its parameters (FSDP2): strategy "fsdp" across more than one process."""
    return config.strategy == "fsdp" and world_size > 1


def prepare_model(config: TrainConfig, device: torch.device | None = None, *, weights: bool = True,
                  model_config: Qwen3Config | None = None) -> nn.Module:
    """The model a run of `config` trains (see the module docstring). With `weights` it is config.model's
    folder, loaded on `device` (default: this process's GPU, else the CPU) after joining torchrun's process
    group; without, it is built from `model_config` (default: config.model's config.json) on the current
    default device or tensor mode, one process, never compiled (the plan counts the eager step).

    Under FSDP the model is sharded before any weight is read, so no rank ever holds it whole: built on the
    meta device, its adapter attached (shapes only), fully_shard-ed, then filled tensor by tensor with this
    rank's rows. Its adapter starts as it does in one process (A from the run's seed and the layer's name, B
    zero, the magnitude the norm of each row of W, computed where the row lives: FSDP shards W by rows)."""
    device = device or default_device()
    dtype = weights_dtype(config, device)
    sharded = weights and uses_fsdp(config, init_distributed(device)[1])  # a sharded load needs the group first
    if weights and not sharded:
        model = load_model(config.model, dtype=dtype, device=device)
    else:
        with torch.device("meta") if sharded else nullcontext(), default_dtype(dtype):
            model = Qwen3ForCausalLM(model_config or Qwen3Config.from_pretrained(config.model))
    if config.mode == "dora":
        apply_dora(model, config.rank, config.alpha, config.dropout, config.targets, seed=config.seed)
    else:
        model.requires_grad_(True)
    if sharded:
        fill_shards(shard_model(model, config.cpu_offload), config.model, dtype, device, seed=config.seed)
    model.set_gradient_checkpointing(config.gradient_checkpointing, policy=config.checkpoint_policy)
    if config.compile and weights:
        compile_layers(model)
    return model.train()


def ready_for_training(model: nn.Module, config: TrainConfig) -> OneProcess:
    """The run's settings on `model` and this process's strategy for it: one process, DDP (a replica per
    rank, wrapped) or FSDP (sharded here when the model did not come sharded from prepare_model). Gradient
    checkpointing and compile are set as prepare_model sets them (again, which changes nothing, for a model
    that came from there; here, for one a script built)."""
    if hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(config.gradient_checkpointing, policy=config.checkpoint_policy)
    if config.compile:
        compile_layers(model)
    process_rank, world_size = init_distributed(next(model.parameters()).device)
    if world_size == 1:
        return OneProcess(model)
    if uses_fsdp(config, world_size):
        if not is_sharded(model):
            shard_model(model, cpu_offload=config.cpu_offload)  # parameters become sharded DTensors, in place
        return Sharded(model, process_rank, world_size)
    return DataParallel(model, process_rank, world_size)


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Tensors created in the block default to `dtype`: a model built in bf16 has no fp32 copy to cast from."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
