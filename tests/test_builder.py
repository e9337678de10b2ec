"""The one builder: the plan's fake-tensor model and the model a run trains are built the same way (the same
modules, parameters, dtypes, what trains, gradient checkpointing), for each mode, dtype and strategy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fsdp import free_port
from train_child import save_base

import stratos_lite as sl
from stratos_lite.planning.simulator import Simulator

HERE = Path(__file__).parent
SETTINGS = [
    dict(mode="dora", dtype="bfloat16", checkpoint_policy="layer"),
    dict(mode="dora", dtype="float32", checkpoint_policy="mlp"),
    dict(mode="full", dtype="float32", gradient_checkpointing=False),
]


def describe(model: torch.nn.Module) -> dict:
    """What the builder decides about a model, whatever holds it: FSDP2's sharded classes (FSDP<name>) and
    parameters (DTensors, whose shape is the whole tensor's) read as the plain ones."""
    return {"modules": [[name, type(module).__name__.removeprefix("FSDP")] for name, module in model.named_modules()],
            "parameters": [[name, str(p.dtype), p.requires_grad, list(p.shape)]
                           for name, p in model.named_parameters()],
            "checkpointing": [layer.checkpointing for layer in model.model.layers]}


def planned(config: sl.TrainConfig) -> dict:
    """The model the plan simulates (on fake tensors), described."""
    model_config = sl.Qwen3Config.from_pretrained(config.model)
    dtype = sl.compute_dtype(config.dtype, torch.device("cpu"))
    return describe(Simulator(model_config, config, torch.device("cpu"), dtype, config.attention_kernel).model)


@pytest.fixture(scope="module")
def base(demo_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("builder-base")
    save_base(str(demo_dir), folder)
    return folder


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_plan_simulates_the_model_one_process_trains(base, settings):
    config = sl.TrainConfig(model=str(base), rank=4, alpha=8, **settings)
    trained = sl.prepare_model(config, torch.device("cpu"))
    strategy = sl.Trainer(trained, [], config).strategy  # what the Trainer makes of it (one process here)
    assert describe(strategy.model) == planned(config)
    assert any(p.requires_grad for p in trained.parameters())


def test_plan_simulates_the_model_every_rank_trains_under_ddp_and_fsdp(base, tmp_path):
    configs = {strategy: sl.TrainConfig(model=str(base), rank=4, alpha=8, dtype="float32", strategy=strategy)
               for strategy in ("ddp", "fsdp")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(HERE / "builder_child.py"), str(base), str(tmp_path)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    for strategy, config in configs.items():
        for rank in range(2):
            built = json.loads((tmp_path / f"{strategy}-{rank}.json").read_text())
            assert built.pop("sharded") == (strategy == "fsdp")
            assert built == planned(config), (strategy, rank)
