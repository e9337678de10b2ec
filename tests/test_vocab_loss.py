"""The loss over the vocabulary in chunks against the whole projection at once: the same per-token losses and
gradients (to the hidden states, and to the output weight when it trains), alone and inside training steps."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from test_trainer import GradientRecorder, quick_config
from train_child import build

import stratos_lite as sl
from stratos_lite.data.batch import collate
from stratos_lite.data.packing import pack_step
from stratos_lite.model.vocab_loss import token_cross_entropy
from stratos_lite.train.trainer import Trainer


def losses_and_gradients(chunk: int, trainable: bool, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(37, 24, generator=generator) * 2).to(dtype).requires_grad_(True)
    weight = (torch.randn(301, 24, generator=generator) * 0.3).to(dtype).requires_grad_(trainable)
    targets = torch.randint(0, 301, (37,), generator=generator)
    incoming = torch.rand(37, generator=generator)  # what each position's loss weighs in the step
    with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext():
        losses = token_cross_entropy(hidden, weight, targets, chunk)
    (losses * incoming).sum().backward()
    return losses.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen head", "trained head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_give_the_losses_and_gradients_of_the_whole_projection(trainable, dtype):
    whole = losses_and_gradients(0, trainable, dtype)
    for chunk in (5, 16, 36):
        chunked = losses_and_gradients(chunk, trainable, dtype)
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        assert torch.allclose(chunked[0], whole[0], **tolerance)
        assert torch.allclose(chunked[1].float(), whole[1].float(), **tolerance)
        assert (chunked[2] is None) == (not trainable)
        if trainable:
            assert torch.allclose(chunked[2].float(), whole[2].float(), **tolerance)


def tied_model(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return sl.Qwen3ForCausalLM(sl.Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, tie_word_embeddings=True))


def step_gradients(model, dataset, tok, chunk: int, **settings) -> tuple[float, list[torch.Tensor]]:
    """One optimizer step's loss and gradients with the vocabulary in chunks of `chunk` positions."""
    model.zero_grad(set_to_none=True)
    config = quick_config("/tmp/unused", loss_chunk=chunk, max_grad_norm=1e9, **settings)
    trainer = Trainer(model, dataset, config, pad_id=tok.pad_id)
    items = [dataset[i] for i in range(config.batch_size * config.grad_accum)]
    micro = (pack_step(items, config.row_tokens) if config.packing else
             [collate(items[i:i + config.batch_size], tok.pad_id) for i in range(0, len(items), config.batch_size)])
    loss, _, _ = trainer.step([batch.with_loss_positions() for batch in micro], GradientRecorder())
    return loss, [p.grad.clone() for p in trainer.params]


@pytest.mark.parametrize("mode", ["dora", "full untied", "full tied"])
@pytest.mark.parametrize("settings", [dict(checkpoint_policy="layer"), dict(checkpoint_policy="mlp"),
                                      dict(packing=True, pack_tokens=600)], ids=["layer", "mlp", "packed"])
def test_training_steps_in_chunks_equal_the_whole_projection(demo_dir, mode, settings):
    model, dataset, tok = build(str(demo_dir), dropout=0.0, mode=mode.split()[0])
    if mode == "full tied":
        model = tied_model(tok.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)  # a non-zero B, so every adapter tensor has a gradient
    whole_loss, whole = step_gradients(model, dataset, tok, 0, **settings)
    chunked_loss, chunked = step_gradients(model, dataset, tok, 7, **settings)
    assert chunked_loss == pytest.approx(whole_loss, rel=1e-6)
    for a, b in zip(chunked, whole, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
