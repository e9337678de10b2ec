"""The training model, decided in one place: what a TrainConfig trains, and how it is held.

    prepare_model(config)       config.model's folder loaded as the run trains it:
                                  dtype      the frozen base in the compute dtype; weights that train in fp32
                                  adapter    DoRA or LoRA on config.targets (mode "dora", "lora") or every weight
                                  base       the targets' frozen weights in 4 bits (base_quant "nf4") or not
                                  layout     one process and DDP whole; FSDP sharded before any weight is read
    prepare_model(config, weights=False)
                                the same model built from config.json alone, under whatever tensor mode the
                                caller is in: the plan's fake-tensor model is this one
    apply_training_settings(model, config)
                                gradient checkpointing (its policy) and compile
    ready_for_training(model, config)
                                the settings and the strategy of this process (the Trainer calls it), for a
                                model from prepare_model or one a script built itself

Everything that trains goes through here, the plan's simulation included, so the plan predicts the model that
runs. The strategy is chosen by `uses_fsdp` alone.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..config import TrainConfig
from ..model.compiling import compile_layers
from ..model.dora import apply_dora
from ..model.folders import load_weights
from ..model.lora import apply_lora, initialise_adapters
from ..model.nf4 import quantize_base
from ..model.offload import HostActivations
from ..model.qwen3 import Qwen3Config, new_model
from .device import compute_dtype, default_device
from .fsdp import shard_model
from .strategy import DataParallel, OneProcess, Sharded, init_distributed


def weights_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """What the model's weights are stored in: a frozen base in the compute dtype (bf16 where the device
    computes it), weights that train (mode "full") in fp32, which AdamW's small updates need."""
    return compute_dtype(config.dtype, device) if config.mode != "full" else torch.float32


def uses_fsdp(config: TrainConfig, world_size: int) -> bool:
    """Whether the run shards its parameters (FSDP2): strategy "fsdp" across more than one process."""
    return config.strategy == "fsdp" and world_size > 1


def prepare_model(config: TrainConfig, device: torch.device | None = None, *, weights: bool = True,
                  model_config: Qwen3Config | None = None) -> nn.Module:
    """The model a run of `config` trains (see the module docstring). With `weights` it is config.model's
    folder on `device` (default: this process's GPU, else the CPU), after joining torchrun's process group;
    without, it is built from `model_config` (default: config.model's config.json) on the current default
    device or tensor mode: the plan's model, on fake tensors.

    The model is built on the meta device and its adapter attached before a weight is read, so no weight is
    ever held twice: under FSDP each rank then holds and reads only its rows of each tensor. The adapter starts
    as it would on a loaded model (A from the run's seed and the layer's name, B zero, the magnitude the norm of
    each row of W, computed where the row lives)."""
    device = device or default_device()
    dtype = weights_dtype(config, device)
    sharded = weights and uses_fsdp(config, init_distributed(device)[1])  # a sharded load needs the group first
    with torch.device("meta") if weights else nullcontext():
        model = new_model(model_config or Qwen3Config.from_pretrained(config.model), dtype)
    if config.mode != "full":
        apply = apply_dora if config.mode == "dora" else apply_lora
        apply(model, config.rank, config.alpha, config.dropout, config.targets, seed=config.seed, rslora=config.rslora)
        if config.base_quant == "nf4":
            quantize_base(model)  # still empty: load_weights quantizes each weight as it reads it
    else:
        model.requires_grad_(True)
    if sharded:
        shard_model(model, config.cpu_offload, device)  # each parameter a DTensor of this rank's rows
    if weights:
        load_weights(model, config.model, dtype, device)
        initialise_adapters(model)
    return model.train()


def apply_training_settings(model: nn.Module, config: TrainConfig, compiled: bool = True) -> None:
    """Gradient checkpointing with config's policy, activations offloaded to the host or not, and compile
    (`compiled` False leaves it out: the plan counts the eager step). Applying them again changes nothing."""
    if hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(config.gradient_checkpointing, policy=config.checkpoint_policy)
        model.activation_offload = HostActivations if config.offload_activations else None
    if config.compile and compiled:
        compile_layers(model)


def ready_for_training(model: nn.Module, config: TrainConfig) -> OneProcess:
    """The run's settings on `model` (apply_training_settings) and this process's strategy for it: one process,
    DDP (a replica per rank, wrapped) or FSDP (sharded here when the model did not come sharded from
    prepare_model). The Trainer calls it, for a model from prepare_model or one a script built itself."""
    apply_training_settings(model, config)
    process_rank, world_size = init_distributed(next(model.parameters()).device)
    if world_size == 1:
        return OneProcess(model)
    if not uses_fsdp(config, world_size):
        return DataParallel(model, process_rank, world_size)
    return Sharded(model, process_rank, world_size, cpu_offload=config.cpu_offload)
