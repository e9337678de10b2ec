"""Activations held on the host between the forward and the backward: the same run bit for bit, each layer's
input brought back in time (the one before it already on its way), and the plan's device and host lines."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer import quick_config
from train_child import build

import stratos_lite as sl
from stratos_lite.model.offload import HostActivations
from stratos_lite.train.trainer import Trainer


def run(demo_dir, out_dir, **settings) -> tuple[list[str], dict[str, torch.Tensor]]:
    model, dataset, tok = build(str(demo_dir), dropout=0.1)
    Trainer(model, dataset, quick_config(out_dir, max_steps=3, **settings), pad_id=tok.pad_id).train()
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in lines], {n: p.detach().clone() for n, p in model.named_parameters()
                                                         if p.requires_grad}


@pytest.mark.parametrize("settings", [dict(checkpoint_policy="layer"), dict(checkpoint_policy="mlp"),
                                      dict(packing=True, pack_tokens=600, checkpoint_policy="layer")],
                         ids=["layer", "mlp", "packed"])
def test_offloaded_activations_give_the_same_run_bit_for_bit(demo_dir, tmp_path, settings):
    plain = run(demo_dir, tmp_path / "plain", **settings)
    offloaded = run(demo_dir, tmp_path / "offloaded", offload_activations=True, **settings)
    assert offloaded[0] == plain[0]
    assert all(torch.equal(offloaded[1][name], tensor) for name, tensor in plain[1].items())


def test_each_layer_input_goes_to_the_host_once_and_comes_back_before_it_is_needed(tmp_path):
    from conftest import tiny_config, write_hf_checkpoint

    write_hf_checkpoint(tmp_path, tiny_config(num_hidden_layers=3))
    model = sl.load_model(tmp_path, dtype=torch.float32)
    model.set_gradient_checkpointing(True)
    made = []

    def recording(device):
        made.append(HostActivations(device))
        return made[-1]

    model.activation_offload = recording
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids).float().pow(2).mean().backward()
    held = made[0].held
    # Each of the 3 layers' inputs, and cos and sin once (every layer saves the same two).
    assert len(held) == 5 and [tuple(h.host.shape) for h in held].count((2, 9, 64)) == 3
    assert all(h.handed_out for h in held)  # every one came back for the backward
    assert all(h.on_device is None for h in held)  # and none is kept here after it: autograd freed each
