"""Batched decoding with a KV cache: left padding, greedy or temperature/top-p sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .qwen3 import KVCache, Qwen3ForCausalLM

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


class InOrderSteps:
    """Decoding steps over the filled part of each cache (one more key per step). A mask is kept only for a
    padded batch: unpadded rows see every key, and no kernel (flash above all) is ruled out by a mask."""

    def __init__(self, model: Qwen3ForCausalLM, caches: list[KVCache], filled: torch.Tensor, position: torch.Tensor,
                 padded: bool):
        self.model, self.caches, self.filled, self.position, self.padded = model, caches, filled, position, padded

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.padded:
            length = self.caches[0].length
            self.filled[:, length] = True
            mask = self.filled[:, None, None, : length + 1]
        logits = self.model(token[:, None], position_ids=self.position, attention_mask=mask,
                            kv_caches=self.caches)[:, -1]
        self.position = self.position + 1
        return logits


class GraphedSteps:
    """Decoding steps of one fixed shape (batch, cache length): each token is written at a device-side cursor
    (KVCache.cursor) and attends to the whole cache under the mask of filled keys, so no step reads anything
    from the host.

    On a CUDA or ROCm device the first step runs on a side stream (a warm-up that also allocates what the
    kernels need), the second is captured in a CUDA graph, and every step is then one graph replay instead of
    hundreds of kernel launches, which is what decoding at small batches is bound by. The steps, their
    buffers and the graph are kept on the model (`of`), so a later generate() of the same shape replays the
    graph captured before, while the weights it read are unchanged. Elsewhere the same steps run eagerly
    (what the CPU tests compare with InOrderSteps and transformers)."""

    def __init__(self, model: Qwen3ForCausalLM, batch: int, cache_len: int):
        device = model.model.embed_tokens.weight.device
        self.model, self.caches = model, model.new_kv_caches(batch, cache_len)
        self.filled = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.on_cuda, self.steps = device.type == "cuda", 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer, rewritten by each replay
        self.weights = weights_state(model)  # what the graph read: replaying it for other weights would be wrong

    @classmethod
    def of(cls, model: Qwen3ForCausalLM, batch: int, cache_len: int) -> GraphedSteps:
        """The model's steps of this shape, made on first use and kept (in model.decode_graphs) while the
        weights and adapters they were made with stay as they are."""
        weight = model.model.embed_tokens.weight
        key = (batch, cache_len, weight.device, weight.dtype)
        graphs = model.__dict__.setdefault("decode_graphs", {})
        if key not in graphs or graphs[key].weights != weights_state(model):
            graphs[key] = cls(model, batch, cache_len)
        return graphs[key]

    def prefill_caches(self, filled: torch.Tensor) -> list[KVCache]:
        """The caches, emptied for new prompts (keys a longer earlier batch left stay masked by `filled`)."""
        for cache in self.caches:
            cache.length, cache.cursor = 0, None
        self.filled.copy_(filled)
        return self.caches

    def start(self, position: torch.Tensor) -> GraphedSteps:
        """After the prefill: the cursor at the caches' end, each row's next position."""
        self.cursor.fill_(self.caches[0].length)
        for cache in self.caches:
            cache.cursor = self.cursor
        self.position.copy_(position)
        return self

    def step(self) -> torch.Tensor:
        self.filled.index_fill_(1, self.cursor, True)
        return self.model(self.token, position_ids=self.position, attention_mask=self.filled[:, None, None],
                          kv_caches=self.caches)[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token[:, None])
        if not self.on_cuda:
            logits = self.step()
        elif self.steps == 0:
            logits = self._warm_up()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.steps += 1
        self.position += 1
        self.cursor += 1
        return logits

    def _warm_up(self) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.step()
        torch.cuda.current_stream().wait_stream(side)
        return logits

    def _capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step()


def weights_state(model: nn.Module) -> tuple:
    """Where each parameter lives and how often it was changed in place, and whether each adapter is on: what a
    captured decoding step read. Any change (training, a merge, adapters switched off) calls for a new one."""
    return (tuple((p.data_ptr(), p._version) for p in model.parameters()),
            tuple(getattr(m, "adapter_enabled", None) for m in model.modules()))


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
    cuda_graph: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt, up to (not including) the first stop token or `max_new_tokens`.

    stop_check_every: decoding steps between reads of "has every row stopped" (a wait for the device); by
    default every step on a CPU, where it costs nothing, and every STOP_CHECK_EVERY on a GPU.
    cuda_graph: decode with fixed-shape steps (GraphedSteps), captured in a CUDA graph on a CUDA/ROCm device.
    Each step then attends to the whole cache (prompt + max_new_tokens keys), so keep max_new_tokens near
    what the answers need."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    device = model.model.embed_tokens.weight.device
    ids, filled = left_pad(prompts, pad_id, room=max_new_tokens)
    ids, filled = ids.to(device), filled.to(device)
    batch, longest = ids.shape
    positions = (filled[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
    graphed = GraphedSteps.of(model, batch, longest + max_new_tokens) if cuda_graph else None
    caches = graphed.prefill_caches(filled) if graphed else model.new_kv_caches(batch, longest + max_new_tokens)
    last = torch.arange(1, batch + 1, device=device) * longest - 1  # each row's last position, flat
    # Prompts of one length are plain causal attention: a mask only where padding needs one.
    padded = len({len(p) for p in prompts}) > 1
    logits = model(ids, position_ids=positions, attention_mask=prefill_mask(filled[:, :longest]) if padded else None,
                   kv_caches=caches, logits_at=last)
    next_position = positions[:, -1:] + 1
    decode = graphed.start(next_position) if graphed else InOrderSteps(model, caches, filled, next_position, padded)

    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    # Whether every row has stopped is a read of the device: on a GPU it is asked every few tokens, not at
    # each, and rows that stopped meanwhile only add padding (the same output, with fewer waits).
    stop_check_every = stop_check_every or (1 if device.type == "cpu" else STOP_CHECK_EVERY)
    for step in range(max_new_tokens):
        token = pick_tokens(logits, temperature, top_p, generator).masked_fill(done, pad_id)
        out[:, step] = token
        done |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or (step % stop_check_every == stop_check_every - 1 and bool(done.all())):
            break
        logits = decode(token)
    return [_until_stop(row, set(stop_ids)) for row in out.tolist()]


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens
