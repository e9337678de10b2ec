"""How far a GGUF file's next-token distribution strays from the torch model's: the mean KL divergence
KL(torch || file) per token, the figure `llama-perplexity --kl-divergence` reports for a quantization against
its f16 base.

Here the reference is the torch model itself and the text is the held-out examples: each eval record's prompt
and its reference completion, with the divergence taken at every position that predicts a completion token
(what the served model is asked to produce). A score is decided by a few tokens, so two files can score alike
on a small eval set while one of them is measurably further from the model; the divergence shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.records import ParsedRecord
from ..model.tokenizer import Tokenizer
from .engines import default_gpu_layers, import_llama_cpp


def completion_sequences(tokenizer: Tokenizer, records: Sequence[ParsedRecord]) -> list[tuple[list[int], int]]:
    """Each record as (prompt + reference completion tokens, prompt length)."""
    chats = [tokenizer.encode_chat(record.messages, record.completion) for record in records]
    return [(list(chat.input_ids), chat.prompt_length) for chat in chats]


def _kl(reference_logits: np.ndarray, other_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(other)) per row, in float64."""
    reference = torch.log_softmax(torch.from_numpy(reference_logits).double(), dim=-1)
    other = torch.log_softmax(torch.from_numpy(other_logits).double(), dim=-1)
    return (reference.exp() * (reference - other)).sum(dim=-1).numpy()


@torch.no_grad()
def _torch_logits(model, ids: list[int], first: int) -> np.ndarray:
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0, first:len(ids) - 1]
    return logits.float().cpu().numpy()


def next_token_kl(model, tokenizer: Tokenizer, records: Sequence[ParsedRecord], path: str | Path,
                  lora: str | Path | None = None, n_gpu_layers: int | None = None) -> float:
    """The mean KL divergence of the GGUF at `path` (with the LoRA adapter GGUF `lora` over it when given) from
    `model`, over the completion positions of `records`. llama.cpp keeps an f32 KV cache here, so that the
    figure measures the file, not the cache's rounding."""
    llama_cpp = import_llama_cpp()
    sequences = completion_sequences(tokenizer, records)
    if n_gpu_layers is None:
        n_gpu_layers = default_gpu_layers(llama_cpp)
    options = {"lora_path": str(lora)} if lora else {}
    longest = max(len(ids) for ids, _ in sequences)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=longest, n_batch=longest, n_ubatch=longest, logits_all=True,
                          type_k=0, type_v=0, n_gpu_layers=n_gpu_layers, verbose=False, **options)
    was_training = model.training
    model.eval()
    try:
        divergences = []
        for ids, prompt_length in sequences:
            first = prompt_length - 1  # the position whose logits predict the first completion token
            llm.reset()
            llm.eval(ids)
            theirs = np.asarray(llm.scores[first:len(ids) - 1], dtype=np.float32)
            divergences.append(_kl(_torch_logits(model, ids, first), theirs))
    finally:
        llm.close()
        model.train(was_training)
    return float(np.concatenate(divergences).mean())
