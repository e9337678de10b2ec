"""Adapter folders in PEFT's layout, both ways: adapter_config.json + adapter_model.safetensors, as `peft`
writes and reads them (its LoRA tuner with use_dora), so an adapter trained here loads in PEFT and one PEFT
wrote loads here. Tensor names are the model's module names under PEFT's prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..storage.atomic import staged_folder
from ..storage.files import ModelFileError, open_safetensors, read_json
from .dora import AdapterSummary, DoRALinear, apply_dora, dora_layers, has_dora, summarize

PEFT_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"

ADAPTER_TENSORS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def _peft_tensors(name: str, layer: DoRALinear) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{name}.{peft}": getattr(layer, ours) for ours, peft in ADAPTER_TENSORS.items()}


def adapter_config(model: nn.Module, base_model_name_or_path: str = "") -> dict:
    """PEFT's adapter_config.json for the DoRA layers in `model` (all layers share one setting)."""
    layers = list(dora_layers(model))
    if not layers:
        raise ValueError("the model has no DoRA layers; call apply_dora or load_adapter first")
    settings = {(layer.rank, layer.alpha, layer.dropout) for _, layer in layers}
    if len(settings) != 1:
        raise ValueError(f"DoRA layers disagree on (rank, alpha, dropout): {sorted(settings)}")
    rank, alpha, dropout = settings.pop()
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "use_dora": True, "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": sorted({name.rpartition(".")[2] for name, _ in layers}),
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str = "",
                 values: dict[str, torch.Tensor] | None = None) -> Path:
    """The model's DoRA adapter in PEFT's layout. `values` (parameter name -> tensor) stands in for the
    layers' own tensors, e.g. whole tensors gathered from the ranks that shard them."""
    config = adapter_config(model, base_model_name_or_path)
    if values is None:
        tensors = {k: v for name, layer in dora_layers(model) for k, v in _peft_tensors(name, layer).items()}
    else:
        tensors = {f"{PEFT_PREFIX}{name}.{peft}": values[f"{name}.{ours}"] for name, _ in dora_layers(model)
                   for ours, peft in ADAPTER_TENSORS.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with staged_folder(folder) as staging:  # a kill or full disk never leaves half an adapter under `folder`
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return Path(folder)


def _read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelFileError(f"{path}: not found; an adapter folder needs {CONFIG_NAME}")
    config = read_json(path)
    problems = []
    if config.get("peft_type") != "LORA" or not config.get("use_dora"):
        problems.append("peft_type LORA with use_dora true is required")
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rslora, rank_pattern and alpha_pattern are not supported")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is not supported")
    if problems:
        raise ModelFileError(f"{path}: " + "; ".join(problems))
    return config


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> AdapterSummary:
    """Load a PEFT DoRA adapter (ours or PEFT's) into `model`, wrapping its linears first if needed."""
    folder = Path(folder)
    config = _read_adapter_config(folder)
    if not has_dora(model):
        try:
            apply_dora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                       config["target_modules"], dtype)
        except ValueError as error:
            raise ModelFileError(f"{folder / CONFIG_NAME}: {error}") from None
    layers = dict(dora_layers(model))
    expected = {k: v for name, layer in layers.items() for k, v in _peft_tensors(name, layer).items()}
    path = folder / WEIGHTS_NAME
    with open_safetensors(path) as f:
        stored = {k.removesuffix(".weight") if "lora_magnitude_vector" in k else k: k for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        unexpected, missing = sorted(stored.keys() - expected.keys()), sorted(expected.keys() - stored.keys())
        if unexpected:
            raise ModelFileError(f"{path}: tensor {unexpected[0]!r} does not fit any DoRA layer of the model")
        if missing:
            raise ModelFileError(f"{path}: tensor {missing[0]!r} is missing")
        tensors = {key: f.get_tensor(stored[key]) for key in expected}
    for key, tensor in tensors.items():  # check every shape before changing anything
        if tensor.shape != expected[key].shape:
            raise ModelFileError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"the model needs {tuple(expected[key].shape)}")
    for key, tensor in tensors.items():
        expected[key].copy_(tensor)
    return summarize(model, len(layers))
