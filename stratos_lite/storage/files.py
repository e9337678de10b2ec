"""Reading the files a run depends on, so that a file that does not parse is named with the parser's reason.

A JSON, TOML or safetensors file that is truncated or hand-edited into nonsense raises `FileFormatError`
naming the path and what is wrong, instead of a bare `JSONDecodeError` or `SafetensorError`; one that parses
but does not fit raises `ModelFileError` (an HF model folder or an adapter folder) or `CheckpointError` (a
training checkpoint, a kind of it).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file


class FileFormatError(ValueError):
    """A file that does not parse as what it should be; the message names the file and the reason."""


class ModelFileError(ValueError):
    """An HF model folder or an adapter folder whose files parse but do not fit what was asked of them (a
    tensor missing, misshapen or unexpected, a model that is not Qwen3, an adapter that does not fit)."""


class CheckpointError(ModelFileError):
    """A training checkpoint that cannot be resumed: none intact, or its tensors do not fit the model."""


def read_json(path: str | Path) -> dict:
    """A JSON file holding one object (every JSON file a model folder or checkpoint has is one)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: not a JSON object but a {type(value).__name__}")
    return value


def read_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{path}: not valid TOML: {error}") from None


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The header of a safetensors file (tensor name -> dtype, shape, data_offsets; metadata removed) and
    the offset where its data starts, after checking that the file holds every byte the header promises."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise FileFormatError(f"{path}: not a safetensors file: {size} bytes, shorter than its length prefix")
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8:
            raise FileFormatError(f"{path}: truncated or not safetensors: the header claims {header_size} bytes, "
                                  f"the file holds {size - 8} after the length prefix")
        try:
            header = json.loads(file.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FileFormatError(f"{path}: not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_size
    try:
        needed = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        raise FileFormatError(f"{path}: not a safetensors file: a header entry has no data_offsets") from None
    if data_start + needed > size:
        raise FileFormatError(f"{path}: truncated: its tensors need {data_start + needed} bytes, "
                              f"the file holds {size}")
    return header, data_start


def open_safetensors(path: str | Path):
    """`safe_open` on the CPU, after the header check above (a truncated file is named, not mapped)."""
    safetensors_header(path)
    return safe_open(str(path), framework="pt", device="cpu")


def load_safetensors(path: str | Path) -> dict:
    """Every tensor of a safetensors file, after the header check above."""
    safetensors_header(path)
    return load_file(str(path))
