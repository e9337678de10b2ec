"""Calls into llama.cpp (llama-cpp-python), each meant to run through `isolation.call_in_child`.

They take and return plain values (paths, lists, numpy arrays), so that the call crosses the process
boundary, and each opens the file itself, since a llama.cpp handle cannot be pickled.
"""

from __future__ import annotations

import numpy as np


def _open(path, **options):
    from llama_cpp import Llama

    return Llama(model_path=str(path), verbose=False, n_threads=2, **options)


def logits(path, tokens: list[int], f32_cache: bool, lora=None) -> np.ndarray:
    """llama.cpp's logits at every position of `tokens`, shape (len(tokens), vocab); with `lora`, that adapter
    GGUF applied over the model as llama.cpp's --lora applies it."""
    options = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32 key/value cache
    if lora:
        options["lora_path"] = str(lora)
    llm = _open(path, n_ctx=128, n_batch=128, logits_all=True, **options)
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)])
    llm.close()
    return scores


def greedy(path, tokens: list[int], count: int, lora=None) -> list[int]:
    """`count` tokens llama.cpp decodes greedily after `tokens` (f32 KV cache), with a LoRA adapter GGUF or not."""
    options = {"lora_path": str(lora)} if lora else {}
    llm = _open(path, n_ctx=128, type_k=0, type_v=0, **options)
    generated = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        generated.append(token)
        if len(generated) == count:
            break
    llm.close()
    return generated


def tokenize(path, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids llama.cpp gives each text from the GGUF's own vocabulary (no BOS added)."""
    llm = _open(path, vocab_only=True)
    ids = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=special) for text in texts]
    llm.close()
    return ids


def detokenize(path, sequences: list[list[int]], special: bool) -> list[str]:
    """The text llama.cpp renders back from each token sequence."""
    llm = _open(path, vocab_only=True)
    texts = [llm.detokenize(ids, special=special).decode("utf-8") for ids in sequences]
    llm.close()
    return texts


def metadata(path) -> dict[str, str]:
    """The GGUF key/value metadata as llama.cpp read it."""
    llm = _open(path, vocab_only=True)
    values = dict(llm.metadata)
    llm.close()
    return values


def evaluate_with_gguf(model_dir, eval_path, out_dir, gguf_path) -> dict:
    """stratos_lite's evaluation of a saved model and of its GGUF export side by side (f32 KV cache)."""
    import torch

    import stratos_lite as sl
    from stratos_lite.evaluation.evaluate import evaluate

    model, tokenizer = sl.load_pretrained(model_dir, dtype=torch.float32)
    return evaluate(model, tokenizer, eval_path, out_dir, batch_size=4, max_new_tokens=24, progress=False,
                    compare_adapters_off=False, gguf=[gguf_path], gguf_options={"f32_cache": True, "n_ctx": 512})


def prompt_checks(gguf_path, tokenizer_dir, modelfile=None) -> list[dict]:
    """stratos_lite.serving's checks of the prompts servers build from a GGUF (and its Modelfile)."""
    import stratos_lite as sl
    from stratos_lite.data.task import scoring_messages
    from stratos_lite.evaluation.serving import served_prompt_checks

    tokenizer = sl.Tokenizer.from_pretrained(tokenizer_dir)
    llm = _open(gguf_path, vocab_only=True)
    messages = scoring_messages("Geophysicist, Kuwait.", "Oil output rises", "KOC said output rose.")
    checks = [c.to_dict() for c in served_prompt_checks(llm, tokenizer, messages, modelfile)]
    llm.close()
    return checks


def quantize(source, target, file_type: int) -> None:
    """llama.cpp's own quantizer (what `llama-quantize` runs): `source` GGUF to `target` in `file_type`, a
    llama_ftype such as gguf.LlamaFileType.MOSTLY_Q4_K_M."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = 2
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source}, {target}, {file_type}) returned {status}")


def llama_tool(name: str) -> str:
    """The path of llama.cpp's `name` program (llama-imatrix, llama-quantize) that scripts/build_llama_tools.sh
    built; scripts/test.sh puts its folder in STRATOS_LLAMA_TOOLS."""
    import os
    from pathlib import Path

    folder = os.environ.get("STRATOS_LLAMA_TOOLS")
    if not folder:
        raise RuntimeError("STRATOS_LLAMA_TOOLS is not set: run the suite with scripts/test.sh, or "
                           "export STRATOS_LLAMA_TOOLS=$(bash scripts/build_llama_tools.sh)")
    program = Path(folder) / name
    if not program.is_file():
        raise RuntimeError(f"{program}: missing; rebuild with scripts/build_llama_tools.sh")
    return str(program)


def run_tool(name: str, *arguments) -> str:
    """Run a llama.cpp program on two threads; its output, or an error holding it when it fails."""
    import subprocess

    done = subprocess.run([llama_tool(name), *map(str, arguments)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited with {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def quantize_with_imatrix(source, target, preset: str, imatrix) -> None:
    """llama-quantize --imatrix IMATRIX SOURCE TARGET PRESET (e.g. Q4_K_M)."""
    run_tool("llama-quantize", "--imatrix", imatrix, source, target, preset, 2)


def imatrix(model, text_file, out, chunk: int, process_output: bool) -> None:
    """llama-imatrix over `text_file` in chunks of `chunk` tokens (one chunk a batch), with an f32 KV cache
    (its default f16 cache rounds the attention's inputs), without perplexity."""
    options = ["--process-output"] if process_output else []
    run_tool("llama-imatrix", "-m", model, "-f", text_file, "-o", out, "-c", chunk, "-b", chunk, "-t", 2,
             "-ctk", "f32", "-ctv", "f32", "--no-ppl", *options)
