"""Hugging Face model folders in and out: config.json + single-file or sharded safetensors.

Loading builds the model on the meta device and fills it tensor by tensor, shard by shard, so memory peaks
near the size of the weights. When the file's dtype is the requested one on the CPU, the parameters keep
pointing into the memory-mapped file and nothing is copied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..storage.atomic import staged_folder
from ..storage.files import ModelFileError, read_json, safetensors_header
from .nf4 import quantize_base, quantized_layers
from .peft_files import attach_adapter_layers, load_adapter
from .qwen3 import Qwen3Config, Qwen3ForCausalLM
from .shards import copy_whole_into
from .tokenizer import Tokenizer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def folder_shards(folder: Path) -> dict[Path, set[str]]:
    """Each safetensors file of the checkpoint with the tensor names the index promises it holds
    (an empty set for a single-file checkpoint, whose contents are read from the file itself)."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{index}: no weight_map object")
        shards: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(folder / file, set()).add(name)
        for shard in shards:
            if not shard.is_file():
                raise ModelFileError(f"{shard}: shard listed in {index} is missing")
        return shards
    single = folder / SINGLE_NAME
    if single.is_file():
        return {single: set()}
    raise ModelFileError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=requires_grad))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_shard(shard: Path, promised: set[str], dtype: torch.dtype,
                skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a shard but those in `skip` (never read). Tensors already in `dtype` are memory-mapped
    (no copy); tensors to be cast are read one at a time into a buffer freed after the cast, so a shard's
    pages never pile up in memory beside the converted weights."""
    header, data_start = safetensors_header(shard)
    with open(shard, "rb") as file, safe_open(str(shard), framework="pt", device="cpu") as mapped:
        absent = sorted(promised - header.keys())
        if absent:
            raise ModelFileError(f"{shard}: tensor {absent[0]!r} listed in the index is not in the file")
        for name in sorted(header.keys() - skip):
            info = header[name]
            source = _SAFETENSORS_DTYPES.get(info["dtype"])
            if source is None:
                raise ModelFileError(f"{shard}: tensor {name!r} has dtype {info['dtype']}, not a float type")
            if source == dtype:
                yield name, mapped.get_tensor(name)
                continue
            begin, end = info["data_offsets"]
            file.seek(data_start + begin)
            buffer = bytearray(end - begin)
            file.readinto(buffer)
            yield name, torch.frombuffer(buffer, dtype=source).view(info["shape"])


def folder_dtype(folder: str | Path) -> torch.dtype:
    """The dtype the checkpoint's tensors are stored in (that of its first tensor)."""
    header, _ = safetensors_header(next(iter(folder_shards(Path(folder)))))
    return _SAFETENSORS_DTYPES[next(iter(header.values()))["dtype"]]


def folder_tensors(folder: str | Path, model: Qwen3ForCausalLM, dtype: torch.dtype,
                       expected: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of an HF folder, in `dtype`, its name and whole shape checked against `expected` (the
    model's parameters by checkpoint name; a sharded parameter reports its whole shape); raises at the end
    if one was missing."""
    folder = Path(folder)
    if expected is None:
        expected = dict(model.named_parameters())  # tied lm_head.weight is the embedding, listed once
    loaded: set[str] = set()
    # Tied checkpoints may still carry a copy of the embedding as lm_head.weight: it is not even read.
    skip = frozenset({"lm_head.weight"} if model.config.tie_word_embeddings else ())
    for shard, promised in folder_shards(folder).items():
        for name, tensor in _read_shard(shard, promised, dtype, skip):
            if name not in expected:
                raise ModelFileError(f"{shard}: unexpected tensor {name!r} for a Qwen3 model")
            want = tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                raise ModelFileError(f"{shard}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"config.json implies {want}")
            yield name, tensor.to(dtype)
            loaded.add(name)
    missing = sorted(expected.keys() - loaded)
    if missing:
        raise ModelFileError(f"{folder}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu") -> Qwen3ForCausalLM:
    """Qwen3ForCausalLM with the weights of an HF folder, cast to `dtype` on `device`."""
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config.from_pretrained(path))
    load_weights(model, path, dtype, device)
    return model.eval()  # like transformers: dropout off until a trainer asks for train()


@torch.no_grad()
def load_weights(model: Qwen3ForCausalLM, folder: str | Path, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> None:
    """Fill `model`'s weights from an HF folder, in `dtype` on `device`, tensor by tensor: a parameter on the
    meta device is replaced by the folder's tensor (memory-mapped, not copied, when it is the file's dtype on the
    CPU), a sharded one (FSDP2) takes this rank's rows, any other is copied into. A frozen base under an adapter
    is found by the folder's name (q_proj.weight is q_proj.base_layer.weight here) and stays frozen; a 4-bit one
    (model/nf4.py) is quantized on `device` as its tensor is read, so the whole base never exists there. Tensors the
    folder does not hold (an adapter's own) are made on `device`, empty, when still on the meta device: the
    adapter starts from them (lora.initialise_adapters)."""
    params = dict(model.named_parameters())
    # An adapter wraps a linear as its `base_layer`: the wrapper's other tensors are its own, not the folder's.
    own = {f"{owner}.{name}" for owner, module in model.named_modules() if hasattr(module, "base_layer")
           for name, _ in module.named_parameters(recurse=False)}
    quantized = {f"{name}.weight": layer for name, layer in quantized_layers(model).items()}  # a 4-bit base
    by_folder_name = {name.replace(".base_layer.", "."): name for name in [*params, *quantized] if name not in own}
    expected = {**{name: torch.empty(layer.out_features, layer.in_features, device="meta")
                   for name, layer in quantized.items()}, **params}
    expected = {folder_name: expected[name] for folder_name, name in by_folder_name.items()}
    for folder_name, tensor in folder_tensors(folder, model, dtype, expected):
        name = by_folder_name[folder_name]
        if name in quantized:  # quantized on `device`, where it will compute, one tensor at a time
            quantized[name].quantize_(tensor.to(device=device))
            continue
        param = params[name]
        if param.is_meta:
            _set_parameter(model, name, tensor.to(device=device), param.requires_grad)
        else:
            copy_whole_into(param, tensor.to(device=param.device))
    for name, param in model.named_parameters():
        if param.is_meta:
            _set_parameter(model, name, torch.empty_like(param, device=device), param.requires_grad)
    model.tie_weights()


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu") -> tuple[Qwen3ForCausalLM, Tokenizer]:
    return load_model(path, dtype=dtype, device=device), Tokenizer.from_pretrained(path)


def parse_size(size: int | str) -> int:
    """Bytes from 5_000_000_000, "5GB", "500MB" or "2GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a size from {size!r}; use bytes or e.g. '5GB'")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def hf_state_dict(model: Qwen3ForCausalLM, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the names transformers expects (tied lm_head left out, as HF saves it);
    `values` (name -> tensor) stands in for the parameters, e.g. whole tensors gathered from shards."""
    tensors = {name: (p if values is None else values[name]).detach()
               for name, p in model.named_parameters(remove_duplicate=True)}
    with torch.device("meta"):
        expected = set(dict(Qwen3ForCausalLM(model.config).named_parameters()))
    foreign = sorted(tensors.keys() - expected)
    if foreign:
        raise ModelFileError(f"the model holds {foreign[0]!r}, not part of a plain Qwen3 model folder; "
                              "merge adapters (merge_adapters) or save them with save_adapter")
    return tensors


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_pretrained(model: Qwen3ForCausalLM, tokenizer: Tokenizer | None, path: str | Path,
                    max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None,
                    values: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an HF folder transformers loads. Written beside the target and renamed into place at the end,
    so an interrupted save never leaves a half-written model under `path`. `values`: see hf_state_dict."""
    tensors = hf_state_dict(model, values)
    dtype = dtype or next(iter(tensors.values())).dtype
    shards = _plan_shards(tensors, parse_size(max_shard_size))
    with staged_folder(path) as staging:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            file = SINGLE_NAME if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: v.to(dtype).contiguous().cpu() for k, v in shard.items()}, str(staging / file),
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        if len(shards) > 1:
            total = sum(t.numel() * dtype.itemsize for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(model.config.to_hf_dict(dtype), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(path)


def load_pretrained_with_adapter(path: str | Path, adapter: str | Path | None = None,
                                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                                 base_quant: str = "none") -> tuple[nn.Module, Tokenizer]:
    """An HF model folder, with a PEFT DoRA adapter on top when one is given (left unmerged). base_quant "nf4":
    the adapter's target linears are quantized to 4 bits while loading (model/nf4.py), as a run with
    base_quant = "nf4" trained on them."""
    if base_quant == "none":
        model, tokenizer = load_pretrained(path, dtype=dtype, device=device)
        if adapter:
            load_adapter(model, adapter)
            model.to(device)
        return model, tokenizer
    if base_quant != "nf4" or not adapter:
        raise ValueError(f"base_quant {base_quant!r}: 'nf4' quantizes the base under an adapter (give one), or 'none'")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config.from_pretrained(path))
    attach_adapter_layers(model, adapter)
    quantize_base(model)
    load_weights(model, path, dtype, device)
    load_adapter(model, adapter)
    return model.eval(), Tokenizer.from_pretrained(path)
