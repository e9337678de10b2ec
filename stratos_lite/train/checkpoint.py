"""Training checkpoints: written whole or not at all, loaded without unpickling anything.

A checkpoint is a folder `checkpoint-{step:06d}` holding the trainable tensors (`trainable.safetensors`),
the optimizer's tensors (`optimizer.safetensors`), RNG states (`rng.safetensors`), everything else as
JSON (`state.json`: step, config, scheduler, sampler position, optimizer hyperparameters, the data's identity),
and for DoRA models the adapter in PEFT's layout (`adapter/`), plus `manifest.json`: the size and SHA-256
of every other file. It is written under a temporary name and renamed when complete (atomic.py), so a kill
or a full disk mid-save leaves the previous checkpoints as they were; the manifest catches what goes wrong on
disk afterwards (a truncated copy, a bad sector), and resuming skips a checkpoint that fails it for the newest
one that passes.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.lora import has_adapters
from ..model.peft_files import save_adapter
from ..storage.atomic import staged_folder
from ..storage.files import CheckpointError, load_safetensors, read_json

PATTERN = re.compile(r"checkpoint-(\d{6})")
MANIFEST = "manifest.json"


class CheckpointWarning(UserWarning):
    """A checkpoint was passed over because it is damaged; the message names it and says why."""


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and PATTERN.fullmatch(p.name))


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as tensors (for safetensors) and the rest (for JSON)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def capture_rng() -> dict:
    """This process's random number generators: torch's CPU generator, its own GPU's (the current device:
    each rank has set its own), Python's."""
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": [version, list(internal), gauss]}


def _rng_files(rng_by_rank: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every rank's generators as tensors (rng.safetensors: rank{r}.torch, rank{r}.cuda) and JSON."""
    tensors = {}
    for rank, rng in enumerate(rng_by_rank):
        tensors[f"rank{rank}.torch"] = rng["torch"]
        if rng["cuda"] is not None:
            tensors[f"rank{rank}.cuda"] = rng["cuda"]
    return tensors, {"python": [rng["python"] for rng in rng_by_rank], "ranks": len(rng_by_rank)}


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, trainable: dict[str, torch.Tensor],
                    optimizer_state: dict, state: dict, keep: int, base_model_name_or_path: str = "",
                    rng_by_rank: list[dict] | None = None) -> Path:
    """Write checkpoint-{step} atomically, then keep only the newest `keep` checkpoints. `trainable` and
    `optimizer_state` are whole (the strategy's whole_state), so the checkpoint does not depend on how many
    ranks wrote it; `model` names the DoRA layers for the adapter; `rng_by_rank` holds each rank's generators
    (capture_rng; default: this process's)."""
    out = Path(out_dir)
    final = out / f"checkpoint-{step:06d}"
    # A checkpoint of the same step may exist from an earlier run that was interrupted, or whose copy was
    # damaged: the new one replaces it. When the disk fills up, the half-written one is removed and the
    # older checkpoints stay as they are.
    with staged_folder(final) as staging:
        save_file({k: v.cpu().contiguous() for k, v in trainable.items()}, str(staging / "trainable.safetensors"))
        optimizer_tensors, optimizer_json = _optimizer_tensors(optimizer_state)
        save_file(optimizer_tensors, str(staging / "optimizer.safetensors"))
        rng_tensors, rng_json = _rng_files(rng_by_rank or [capture_rng()])
        save_file(rng_tensors, str(staging / "rng.safetensors"))
        (staging / "state.json").write_text(json.dumps({**state, "optimizer": optimizer_json, "rng": rng_json},
                                                       indent=1))
        if has_adapters(model):
            save_adapter(model, staging / "adapter", base_model_name_or_path, values=trainable)
        (staging / MANIFEST).write_text(json.dumps(describe_files(staging), indent=1))
    for old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file under `folder` but the manifest, by path relative to it."""
    return {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def checkpoint_damage(folder: str | Path) -> str | None:
    """Why the checkpoint cannot be trusted (a file missing, of the wrong size or content), or None when
    every file is as its manifest says it was written."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} holds {size} bytes, {expected['bytes']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match the SHA-256 written with it"
    return None


def newest_intact_checkpoint(out_dir: str | Path, passed_over=lambda folder, reason: None) -> Path | None:
    """The newest checkpoint whose files match their manifest, or None when there is none. Each damaged newer
    one is handed to `passed_over(folder, reason)` and left on disk. Raises when checkpoints exist but none
    is intact: starting afresh would discard them."""
    damaged = []
    for folder in reversed(checkpoints(out_dir)):
        reason = checkpoint_damage(folder)
        if reason is None:
            return folder
        passed_over(folder, reason)
        damaged.append(f"{folder.name}: {reason}")
    if damaged:
        raise CheckpointError(f"{out_dir}: no intact checkpoint to resume from ({'; '.join(damaged)}). "
                              "Nothing was deleted: restore them, or move them aside to start afresh.")
    return None


@dataclass
class SavedCheckpoint:
    """A checkpoint as read from disk: whole tensors, to be restored by whatever holds the model."""
    trainable: dict[str, torch.Tensor]
    optimizer_state: dict  # torch's index-keyed state_dict
    state: dict  # state.json: step, config, scheduler, sampler position, ...
    rng: dict


def read_checkpoint(folder: str | Path, model: nn.Module) -> SavedCheckpoint:
    """A checkpoint's contents, its trainable tensors checked by name and shape against `model`'s."""
    folder = Path(folder)
    state = read_json(folder / "state.json")
    trainable = _read_trainable(folder / "trainable.safetensors", model)
    optimizer_json = state.pop("optimizer")
    tensors = load_safetensors(folder / "optimizer.safetensors")
    per_param: dict[int, dict] = {}
    for key, value in [*tensors.items(), *optimizer_json["scalars"].items()]:
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer_state = {"state": per_param, "param_groups": optimizer_json["param_groups"]}
    rng = {"tensors": load_safetensors(folder / "rng.safetensors"), **state.pop("rng")}
    return SavedCheckpoint(trainable, optimizer_state, state, rng)


def restore_rng(rng: dict, process_rank: int = 0, world_size: int = 1) -> None:
    """Put back this rank's generators as the checkpoint saved them, so dropout continues exactly. Resumed on
    another number of ranks, the draws cannot continue as they were; every rank then takes rank 0's."""
    tensors = rng["tensors"]
    if "torch" in tensors:  # written before checkpoints kept every rank's generators: rank 0's only
        tensors = {"rank0.torch": tensors["torch"], "rank0.cuda": tensors.get("cuda.0")}
        rng = {**rng, "python": [rng["python"]], "ranks": 1}
    own = process_rank if rng.get("ranks") == world_size else 0
    torch.set_rng_state(tensors[f"rank{own}.torch"])
    if tensors.get(f"rank{own}.cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rank{own}.cuda"])
    version, internal, gauss = rng["python"][own]
    random.setstate((version, tuple(internal), gauss))


def _read_trainable(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The stored trainable tensors, checked name by name and shape by shape against the model's."""
    stored = load_safetensors(path)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - stored.keys()), sorted(stored.keys() - params.keys())
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise CheckpointError(f"{path}: tensor {name!r} is {'missing' if missing else 'not trainable in this model'}")
    for name, tensor in stored.items():
        if tensor.shape != params[name].shape:  # a sharded parameter reports its whole shape
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model has {tuple(params[name].shape)}")
    return stored
