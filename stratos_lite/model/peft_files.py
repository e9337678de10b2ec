"""Adapter folders in PEFT's layout, both ways: adapter_config.json + adapter_model.safetensors, as `peft`
writes and reads them (its LoRA tuner, with use_dora for DoRA and use_rslora for rsLoRA's scaling), so an
adapter trained here loads in PEFT and one PEFT wrote loads here. Tensor names are the model's module names
under PEFT's prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..storage.atomic import staged_folder
from ..storage.files import ModelFileError, open_safetensors, read_json
from .dora import apply_dora
from .lora import AdapterSummary, LoRALinear, adapter_layers, apply_lora, has_adapters, lora_scaling, summarize

PEFT_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")

PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def _peft_names(name: str, layer: LoRALinear) -> dict[str, str]:
    """Each tensor of the layer's adapter (our parameter name) -> its name in PEFT's file."""
    return {ours: f"{PEFT_PREFIX}{name}.{PEFT_NAMES[ours]}" for ours in layer.adapter_shapes()}


def _peft_tensors(name: str, layer: LoRALinear) -> dict[str, torch.Tensor]:
    return {peft: getattr(layer, ours) for ours, peft in _peft_names(name, layer).items()}


def adapter_config(model: nn.Module, base_model_name_or_path: str = "") -> dict:
    """PEFT's adapter_config.json for the adapter layers in `model` (all layers share one setting)."""
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("the model has no adapter layers; call apply_lora, apply_dora or load_adapter first")
    settings = {(layer.kind, layer.rank, layer.alpha, layer.dropout, layer.rslora) for _, layer in layers}
    if len(settings) != 1:
        raise ValueError(f"adapter layers disagree on (kind, rank, alpha, dropout, rslora): {sorted(settings)}")
    kind, rank, alpha, dropout, rslora = settings.pop()
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "use_dora": kind == "DoRA", "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": sorted({name.rpartition(".")[2] for name, _ in layers}),
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": rslora, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str = "",
                 values: dict[str, torch.Tensor] | None = None) -> Path:
    """The model's LoRA or DoRA adapter in PEFT's layout. `values` (parameter name -> tensor) stands in for the
    layers' own tensors, e.g. whole tensors gathered from the ranks that shard them."""
    config = adapter_config(model, base_model_name_or_path)
    if values is None:
        tensors = {k: v for name, layer in adapter_layers(model) for k, v in _peft_tensors(name, layer).items()}
    else:
        tensors = {peft: values[f"{name}.{ours}"] for name, layer in adapter_layers(model)
                   for ours, peft in _peft_names(name, layer).items()}
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
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type LORA (with use_dora true or false) is required, not {config.get('peft_type')!r}")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        problems.append(f"needs {', '.join(REQUIRED_KEYS)} (missing: {', '.join(missing)})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern and alpha_pattern are not supported")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is not supported")
    if problems:
        raise ModelFileError(f"{path}: " + "; ".join(problems))
    return config


def attach_adapter_layers(model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Wrap `model`'s linears as the adapter folder's adapter_config.json says, its values not read yet (a model on
    the meta device takes them after its weights: folders.load_pretrained_with_adapter)."""
    folder = Path(folder)
    config = _read_adapter_config(folder)
    apply = apply_dora if config.get("use_dora") else apply_lora
    try:
        apply(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), config["target_modules"],
              dtype, rslora=bool(config.get("use_rslora")))
    except ValueError as error:
        raise ModelFileError(f"{folder / CONFIG_NAME}: {error}") from None


def _check_same_adapter(model: nn.Module, config: dict, path: Path) -> None:
    """The adapter a folder holds must be the one the model's layers are: LoRA or DoRA, and the same scaling."""
    kind = "DoRA" if config.get("use_dora") else "LoRA"
    layer = next(adapter_layers(model))[1]
    if kind != layer.kind:
        raise ModelFileError(f"{path}: a {kind} adapter (use_dora {str(kind == 'DoRA').lower()}), but the model's "
                             f"layers are {layer.kind}: load it into a model without adapters, or train mode "
                             f"{layer.kind.lower()!r}")
    scaling = lora_scaling(config["r"], config["lora_alpha"], bool(config.get("use_rslora")))
    if abs(scaling - layer.scaling) > 1e-6 * abs(layer.scaling):
        raise ModelFileError(f"{path}: scaling {scaling:g} (r, lora_alpha, use_rslora), but the model's layers "
                             f"scale by {layer.scaling:g}")


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> AdapterSummary:
    """Load a PEFT LoRA or DoRA adapter (ours or PEFT's) into `model`, wrapping its linears first if needed. A
    model whose layers already hold an adapter takes only one of the same kind and scaling."""
    folder = Path(folder)
    config = _read_adapter_config(folder)
    if has_adapters(model):
        _check_same_adapter(model, config, folder / CONFIG_NAME)
    else:
        attach_adapter_layers(model, folder, dtype)
    layers = dict(adapter_layers(model))
    expected = {k: v for name, layer in layers.items() for k, v in _peft_tensors(name, layer).items()}
    path = folder / WEIGHTS_NAME
    with open_safetensors(path) as f:
        stored = {k.removesuffix(".weight") if "lora_magnitude_vector" in k else k: k for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        unexpected, missing = sorted(stored.keys() - expected.keys()), sorted(expected.keys() - stored.keys())
        if unexpected:
            raise ModelFileError(f"{path}: tensor {unexpected[0]!r} does not fit any adapter layer of the model")
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
