"""Cross-entropy over the vocabulary from the final hidden states, a chunk of positions at a time.

Qwen3's vocabulary is 151,936 tokens: a position's logits are 304 KB in bf16, twice that as the fp32 copy the
cross-entropy reads, again for their gradient. Projected all at once, a micro-batch's completion positions hold
gigabytes. Here the projection, the log-softmax and the gradient are computed for `chunk` positions at a time,
so no more than one chunk of logits (and of their gradient) exists at once, and only each position's loss and
the gradient to its hidden state are kept.

The gradient is made where it costs least. With the output weight frozen (adapters), each chunk's gradient to
the hidden states, (softmax - onehot) @ W, is made in the forward, right after its logits, and the backward only
scales it by each position's incoming gradient: the same matmuls as the unchunked loss, none repeated. With the
weight trained (full fine-tuning, tied or untied), its gradient needs those incoming gradients, so the backward
projects each chunk again and makes both gradients there. Each logit is computed as the unchunked loss computes
it (F.linear under the caller's autocast, then fp32), so the losses are the same and the gradients agree to the
rounding of where the scale is applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor


def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk: int) -> torch.Tensor:
    """-log p(target) at each of `hidden`'s positions (n, hidden) under logits hidden @ weight^T, fp32 (n,),
    `chunk` positions at a time (0: all at once, the plain projection and cross-entropy)."""
    if chunk <= 0 or chunk >= len(hidden):
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)


def _chunk_starts(hidden: torch.Tensor, chunk: int) -> list[int]:
    """Where each chunk starts. On fake tensors (the plan's simulation, which counts bytes and computes nothing)
    only the chunks that differ are run, the first two and the last: the others allocate and free what these do,
    and a plan of a long micro-batch would otherwise step through thousands of them."""
    starts = list(range(0, len(hidden), chunk))
    return starts[:2] + starts[-1:] if isinstance(hidden, FakeTensor) and len(starts) > 3 else starts


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One chunk's fp32 logits, computed as the unchunked loss computes them (under autocast where it is on)."""
    return F.linear(hidden, weight).float()


def _probabilities_minus_targets(logits: torch.Tensor, targets: torch.Tensor,
                                 log_normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(logits) - onehot(targets), in place of `logits`: the gradient of each row's cross-entropy.
    `log_normaliser`: each row's logsumexp, where the caller has it already."""
    if log_normaliser is None:
        log_normaliser = logits.logsumexp(dim=1)
    probabilities = logits.sub_(log_normaliser[:, None]).exp_()
    probabilities[torch.arange(len(targets), device=targets.device), targets] -= 1
    return probabilities


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        losses = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        needs_weight = weight.requires_grad
        hidden_gradient = torch.empty_like(hidden) if hidden.requires_grad and not needs_weight else None
        for start in _chunk_starts(hidden, chunk):
            rows, wanted = hidden[start:start + chunk], targets[start:start + chunk]
            logits = _chunk_logits(rows, weight)
            log_normaliser = logits.logsumexp(dim=1)  # one pass over the vocabulary for the loss and gradient
            losses[start:start + chunk] = log_normaliser - logits.gather(1, wanted[:, None]).squeeze(1)
            if hidden_gradient is not None:  # the frozen-weight case: the gradient now, while the logits exist
                gradient = _probabilities_minus_targets(logits, wanted, log_normaliser)
                hidden_gradient[start:start + chunk] = F.linear(gradient.to(rows.dtype), weight.t().to(rows.dtype))
        ctx.chunk, ctx.needs_weight = chunk, needs_weight
        ctx.compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type) else None
        ctx.save_for_backward(hidden_gradient if hidden_gradient is not None else hidden, weight, targets)
        return losses

    @staticmethod
    def backward(ctx, incoming):
        saved, weight, targets = ctx.saved_tensors
        if not ctx.needs_weight:  # saved is (softmax - onehot) @ W of each position: scale it by what came in
            return saved * incoming[:, None].to(saved.dtype), None, None, None
        hidden, chunk = saved, ctx.chunk
        hidden_gradient = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        weight_gradient = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(hidden.device.type, dtype=ctx.compute_dtype, enabled=ctx.compute_dtype is not None):
            for start in _chunk_starts(hidden, chunk):
                rows = hidden[start:start + chunk]
                logits = _chunk_logits(rows, weight)
                gradient = _probabilities_minus_targets(logits, targets[start:start + chunk])
                gradient.mul_(incoming[start:start + chunk, None])
                low = gradient.to(ctx.compute_dtype or rows.dtype)
                if hidden_gradient is not None:
                    hidden_gradient[start:start + chunk] = low @ weight.to(low.dtype)
                weight_gradient.addmm_(low.t().float(), rows.float())
        return hidden_gradient, weight_gradient.to(weight.dtype), None, None
