"""Batched decoding with a KV cache: left padding, greedy or temperature/top-p sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .model import Qwen3ForCausalLM

STOP_CHECK_EVERY = 8  # decoding steps between a GPU's checks for "every row has stopped"


def pick_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of `logits` (b, vocab): argmax when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the most likely token always survives.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if generator is not None:  # drawn where the generator lives (a CPU generator for a GPU model, say)
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids right-aligned in a (b, longest) tensor, and a (b, longest + room) mask of the key
    positions that hold a real token (the `room` positions after the prompt are filled while decoding)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    filled = torch.zeros((len(prompts), longest + room), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        filled[row, longest - len(prompt):longest] = True
    return ids, filled


def prefill_mask(filled: torch.Tensor) -> torch.Tensor:
    """Causal mask over the prompt that also hides padding keys, shaped (b, 1, t, t) for SDPA.
    Each position may always see itself, so padding rows are never fully masked (that would give NaN)."""
    t = filled.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=filled.device).tril()
    return ((causal & filled[:, None, :]) | torch.eye(t, dtype=torch.bool, device=filled.device))[:, None]


@torch.inference_mode()
def generate(
    model: Qwen3ForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_check_every: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, up to (not including) the first stop token or `max_new_tokens`.

    stop_check_every: decoding steps between reads of "has every row stopped" (a wait for the device); by
    default every step on a CPU, where it costs nothing, and every STOP_CHECK_EVERY on a GPU."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    device = model.model.embed_tokens.weight.device
    ids, filled = left_pad(prompts, pad_id, room=max_new_tokens)
    ids, filled = ids.to(device), filled.to(device)
    batch, longest = ids.shape
    positions = (filled[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
    caches = model.new_kv_caches(batch, longest + max_new_tokens)
    last = torch.arange(1, batch + 1, device=device) * longest - 1  # each row's last position, flat
    # Masks only where padding needs them: prompts of one length are plain causal attention, and every
    # decoding step then sees all keys, so no kernel (flash above all) is ruled out by a mask.
    padded = len({len(p) for p in prompts}) > 1
    logits = model(ids, position_ids=positions, attention_mask=prefill_mask(filled[:, :longest]) if padded else None,
                   kv_caches=caches, logits_at=last)

    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    next_position = positions[:, -1:] + 1
    # Whether every row has stopped is a read of the device: on a GPU it is asked every few tokens, not at
    # each, and rows that stopped meanwhile only add padding (the same output, with fewer waits).
    stop_check_every = stop_check_every or (1 if device.type == "cpu" else STOP_CHECK_EVERY)
    for step in range(max_new_tokens):
        token = pick_tokens(logits, temperature, top_p, generator).masked_fill(done, pad_id)
        out[:, step] = token
        done |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or (step % stop_check_every == stop_check_every - 1 and bool(done.all())):
            break
        mask = None
        if padded:  # unpadded rows see every key: no mask to keep
            filled[:, longest + step] = True
            mask = filled[:, None, None, : longest + step + 1]
        logits = model(token[:, None], position_ids=next_position, attention_mask=mask, kv_caches=caches)[:, -1]
        next_position = next_position + 1
    return [_until_stop(row, set(stop_ids)) for row in out.tolist()]


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens
