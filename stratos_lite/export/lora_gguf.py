"""A LoRA adapter as llama.cpp's adapter GGUF: one small file that llama.cpp (`--lora`, llama-cpp-python's
`lora_path`) and Ollama (`ADAPTER` in a Modelfile) apply over the base model's GGUF when they load it, so
one base file serves every variant.

The file holds general.architecture "qwen3", general.type "adapter", adapter.type "lora" and
adapter.lora.alpha, then for each adapted linear `<its tensor name in the base GGUF>.lora_a` (A, rank x in)
and `.lora_b` (B, out x rank), in f32 or f16. llama.cpp scales the update by alpha / rank, with the rank read
from lora_a's shape; an rsLoRA adapter (scaling alpha / sqrt(rank)) is written with alpha * sqrt(rank), which
gives its scaling. A DoRA adapter cannot be written: llama.cpp's adapters add B A x and nothing else, and
DoRA's magnitude rescales every row of the merged weight.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..model.lora import adapter_layers, has_adapters
from ..model.qwen3 import Qwen3ForCausalLM
from ..storage.atomic import staged_file, write_text
from .errors import ExportError
from .gguf_file import LAYER_TENSORS
from .modelfile import modelfile_text

ADAPTER_TYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}
DORA_REFUSED = ("a DoRA adapter cannot ship as a llama.cpp adapter: llama.cpp adds B A x and nothing else, and "
                "DoRA's magnitude rescales each row of the merged weight; export the merged model instead "
                "(stratos-lite export --model FOLDER --adapter ADAPTER --out FILE.gguf)")


def base_tensor_name(module_name: str, tied: bool) -> str:
    """The base GGUF's name for the weight of a linear the adapter wraps ("model.layers.3.self_attn.q_proj" ->
    "blk.3.attn_q.weight")."""
    if module_name == "lm_head" and not tied:
        return "output.weight"
    prefix, _, rest = module_name.partition(".layers.")
    index, _, path = rest.partition(".")
    if prefix == "model" and index.isdigit() and path in LAYER_TENSORS:
        return f"blk.{index}.{LAYER_TENSORS[path]}.weight"
    raise ExportError(f"adapter layer {module_name!r} has no tensor of its own in the base GGUF")


def adapter_tensors(model: Qwen3ForCausalLM) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted weight's base GGUF name -> (A, B) of its LoRA layer."""
    if not has_adapters(model):
        raise ExportError("the model has no adapter layers (apply_lora, or load a LoRA adapter folder)")
    layers = list(adapter_layers(model))
    if any(layer.kind != "LoRA" for _, layer in layers):
        raise ExportError(DORA_REFUSED)
    tied = model.config.tie_word_embeddings
    return {base_tensor_name(name, tied): (layer.lora_A.detach(), layer.lora_B.detach()) for name, layer in layers}


def gguf_alpha(model: nn.Module) -> float:
    """The alpha to write, so that llama.cpp's alpha / rank is the layers' own scaling (all layers share it)."""
    scalings = {(layer.rank, layer.scaling) for _, layer in adapter_layers(model)}
    if len(scalings) != 1:
        raise ExportError(f"adapter layers disagree on (rank, scaling): {sorted(scalings)}; llama.cpp takes one alpha")
    rank, scaling = scalings.pop()
    return scaling * rank


def check_against_base(tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], base_gguf: Path) -> None:
    """Every adapted tensor must be in the base GGUF with the shape the adapter updates: llama.cpp refuses the
    pair at load time otherwise, far from the export that made it."""
    try:
        reader = gguf.GGUFReader(base_gguf)
    except (OSError, ValueError) as error:
        raise ExportError(f"{base_gguf}: not a readable GGUF file ({error})") from None
    architecture = reader.fields.get("general.architecture")
    if architecture is None or architecture.contents() != "qwen3":
        raise ExportError(f"{base_gguf}: general.architecture must be 'qwen3' for a Qwen3 adapter")
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # torch order
    for name, (lora_a, lora_b) in tensors.items():
        wanted = (lora_b.shape[0], lora_a.shape[1])
        if shapes.get(name) != wanted:
            found = "no such tensor" if name not in shapes else f"shape {shapes[name]}"
            raise ExportError(f"{base_gguf}: tensor {name}: the adapter updates a {wanted} weight, the file has "
                              f"{found}: export the adapter's own base")


def write_adapter_modelfile(adapter: Path, base_gguf: Path, system: str | None) -> Path:
    """An Ollama Modelfile beside the adapter: FROM the base GGUF (as a path from the adapter's folder) and
    ADAPTER the adapter, with the same template, stops and greedy decoding as a whole model's."""
    base = os.path.relpath(base_gguf.resolve(), adapter.parent.resolve())
    text = modelfile_text(base if base.startswith("..") else f"./{base}", system, adapter=f"./{adapter.name}")
    return write_text(adapter.with_name("Modelfile"), text)


@torch.no_grad()
def export_lora_gguf(model: Qwen3ForCausalLM, path: str | Path, base_gguf: str | Path | None = None,
                     dtype: str = "f16", name: str = "stratos-qwen3-lora", system_prompt: str | None = None) -> Path:
    """Write `model`'s LoRA adapter (unmerged) as a llama.cpp adapter GGUF at `path`. With `base_gguf` (the
    base model's GGUF, exported once with export_gguf), the adapter is checked against its tensors and an Ollama
    Modelfile with FROM base_gguf and ADAPTER path is written beside it."""
    if dtype not in ADAPTER_TYPES:
        raise ExportError(f"adapter dtype must be one of {', '.join(ADAPTER_TYPES)}, got {dtype!r}")
    if not isinstance(model, Qwen3ForCausalLM):
        raise ExportError(f"only Qwen3ForCausalLM adapters export (architecture qwen3), got {type(model).__name__}")
    tensors = adapter_tensors(model)
    if base_gguf is not None:
        check_against_base(tensors, Path(base_gguf))
    alpha = gguf_alpha(model)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    numpy_type, file_type = ADAPTER_TYPES[dtype]
    with staged_file(target) as staging:
        writer = gguf.GGUFWriter(staging, "qwen3")
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_name(name)
            writer.add_file_type(file_type)
            for tensor_name, (lora_a, lora_b) in tensors.items():
                for suffix, tensor in ((".lora_a", lora_a), (".lora_b", lora_b)):
                    values = tensor.float().cpu()
                    if not torch.isfinite(values).all():
                        raise ExportError(f"tensor {tensor_name}{suffix}: non-finite value (NaN or Inf); nothing was "
                                          "written")
                    writer.add_tensor(tensor_name + suffix, values.numpy().astype(numpy_type))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    if base_gguf is not None:
        write_adapter_modelfile(target, Path(base_gguf), system_prompt)
    return target
