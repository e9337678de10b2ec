"""Engines that complete prompts given as token ids: the torch model, and an exported GGUF in llama.cpp.

Evaluation feeds every engine the same prompt ids (our prompt builder's, so no engine re-templates
anything) and reads back the generated ids up to the first stop token, greedily; one report then holds a
column per engine. llama-cpp-python is an optional extra (`pip install stratos_lite[gguf]`), imported only
when a GGUF engine is made.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..model.generate import generate


class EngineError(RuntimeError):
    """An engine could not be made (a missing extra, an unreadable file)."""


class TorchEngine:
    """Batched, KV-cached greedy decoding of a `Qwen3ForCausalLM` (adapters as they are set on it)."""

    def __init__(self, model, pad_id: int, batch_size: int = 16, name: str = "torch"):
        self.model, self.pad_id, self.batch_size, self.name = model, pad_id, batch_size, name

    def complete(self, prompts: Sequence[list[int]], max_new_tokens: int, stop_ids: Sequence[int],
                 progress: bool = False) -> list[list[int]]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
        outputs: dict[int, list[int]] = {}
        for start in tqdm(range(0, len(order), self.batch_size), desc=self.name, disable=not progress,
                          dynamic_ncols=True):
            chunk = order[start:start + self.batch_size]
            generated = generate(self.model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                                 stop_ids=stop_ids, pad_id=self.pad_id)
            outputs.update(zip(chunk, generated, strict=True))
        return [outputs[i] for i in range(len(prompts))]


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise EngineError("evaluating a GGUF needs llama-cpp-python: pip install 'stratos_lite[gguf]' "
                          f"(or scripts/install_llama_cpp.sh for a build that runs on any x86-64 CPU): {error}"
                          ) from None
    return llama_cpp


def gguf_column(path: str | Path, lora: str | Path | None = None) -> str:
    """How a GGUF file (with a LoRA adapter file over it) is named in reports: "base.gguf + adapter.gguf"."""
    return Path(path).name + (f" + {Path(lora).name}" if lora else "")


def default_gpu_layers(llama_cpp) -> int:
    """Every layer on the GPU when llama.cpp was built with CUDA, ROCm, Metal...; none otherwise."""
    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


class LlamaCppEngine:
    """Greedy decoding of a GGUF file in llama.cpp, one prompt at a time. Prompts are sorted so that each
    shares the longest possible prefix with the one before (the system prompt at least), which llama.cpp
    keeps in its KV cache instead of evaluating again."""

    def __init__(self, path: str | Path, n_ctx: int = 4096, n_threads: int | None = None, name: str | None = None,
                 f32_cache: bool = False, n_gpu_layers: int | None = None, lora: str | Path | None = None):
        llama_cpp = import_llama_cpp()
        self.path = Path(path)
        for file in (self.path, *([Path(lora)] if lora else [])):
            if not file.is_file():
                raise EngineError(f"{file}: no such GGUF file")
        options = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32 key/value cache
        if n_gpu_layers is None:
            n_gpu_layers = default_gpu_layers(llama_cpp)
        if lora:  # a LoRA adapter GGUF applied over the model at load time, at its own alpha / rank
            options["lora_path"] = str(lora)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=n_threads, verbose=False,
                                   n_gpu_layers=n_gpu_layers, **options)
        self.name = name or gguf_column(self.path, lora)

    def complete(self, prompts: Sequence[list[int]], max_new_tokens: int, stop_ids: Sequence[int],
                 progress: bool = False) -> list[list[int]]:
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        stops, outputs = set(stop_ids), {}
        for i in tqdm(order, desc=self.name, disable=not progress, dynamic_ncols=True):
            generated: list[int] = []
            # temp 0 is llama.cpp's greedy sampler; no repetition penalty, as in our generate().
            for token in self.llm.generate(prompts[i], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                           reset=True):
                if token in stops:
                    break
                generated.append(token)
                if len(generated) == max_new_tokens:
                    break
            outputs[i] = generated
        return [outputs[i] for i in range(len(prompts))]

    def close(self) -> None:
        self.llm.close()


def timed_complete(engine, prompts: Sequence[list[int]], max_new_tokens: int, stop_ids: Sequence[int],
                   progress: bool = False) -> tuple[list[list[int]], float]:
    """The engine's completions and its examples per second."""
    start = time.perf_counter()
    outputs = engine.complete(prompts, max_new_tokens, stop_ids, progress)
    return outputs, len(prompts) / max(time.perf_counter() - start, 1e-9)
