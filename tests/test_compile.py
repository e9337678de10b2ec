"""TrainConfig.compile: compiled decoder layers train as the eager ones, compile once for every length and
step, and refuse the settings they cannot run with."""

import json

import pytest
import torch
from test_trainer import quick_config
from train_child import build

import stratos_lite as sl
from stratos_lite.config import ConfigError
from stratos_lite.model.compiling import compile_layers
from stratos_lite.model.dora import dora_layers


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_compiled_layers_train_as_the_eager_ones_and_compile_only_in_the_first_step(demo_dir, tmp_path, monkeypatch):
    """Packed rows of many lengths (their per-example attention outside the graph), the MLP recomputed
    inside it, a held-out evaluation: the same losses and adapter as eager layers, and no graph compiled
    after the first step (the norms DoRA holds for each forward are inputs, not constants). One run, as
    compiling costs ~40 s on two cores. Dropout is off: a compiled layer draws its own."""
    graphs_after_step = []
    real_step = sl.Trainer.step

    def counting(self, *args):
        result = real_step(self, *args)
        graphs_after_step.append(compiled_graphs())
        return result

    monkeypatch.setattr(sl.Trainer, "step", counting)
    runs = {}
    for compiled in (False, True):
        model, dataset, tok = build(str(demo_dir), dropout=0.0)
        out = tmp_path / f"compiled-{compiled}"
        config = quick_config(out, compile=compiled, packing=True, max_steps=4, gradient_checkpointing=True,
                              checkpoint_policy="mlp", eval_every=2, eval_examples=8)
        sl.Trainer(model, dataset, config, eval_dataset=dataset, pad_id=tok.pad_id).train()
        graphs_after_step.append(compiled_graphs())  # after the last evaluation too
        runs[compiled] = losses(out), dora_layers(model)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    eager, compiled = dict(runs[False][1]), dict(runs[True][1])
    for name, layer in compiled.items():
        for tensor in ("lora_A", "lora_B", "lora_magnitude"):
            assert torch.allclose(getattr(layer, tensor), getattr(eager[name], tensor), rtol=1e-4, atol=1e-6)
    # Steps 1-2 train, an evaluation follows step 2 (eval mode: its own graphs), steps 3-4, an evaluation.
    step1, step2, step3, step4, end = graphs_after_step[5:]
    assert step2 == step1 and step4 == step3 == end, graphs_after_step


def test_a_compiled_model_still_generates_and_saves_under_its_own_names(tmp_path):
    from conftest import tiny_config, write_hf_checkpoint

    write_hf_checkpoint(tmp_path, tiny_config())
    model = sl.load_model(tmp_path, dtype=torch.float32)
    sl.apply_dora(model, rank=4, alpha=8, dropout=0.0)
    names = list(model.state_dict())
    expected = sl.generate(model.eval(), [[5, 6, 7], [8, 9]], max_new_tokens=6)
    compile_layers(model)
    assert list(model.state_dict()) == names  # checkpoints and adapters keep their keys
    assert sl.generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=6) == expected  # decoding runs eagerly


def test_adapters_applied_after_compiling_train_as_eager_ones():
    """compile_layers passes torch.compile's options on (aot_eager here: the graphs without inductor's code
    generation) and holds DoRA's norms for adapters that arrive after it, which a compiled layer reads."""
    import copy

    from conftest import tiny_config

    torch.manual_seed(0)
    eager = sl.Qwen3ForCausalLM(sl.Qwen3Config.from_dict(tiny_config()))
    compiled = copy.deepcopy(eager)
    compile_layers(compiled, backend="aot_eager")
    ids = torch.randint(0, 100, (2, 9))
    gradients = []
    for model in (eager, compiled):
        sl.apply_dora(model, rank=4, alpha=8, dropout=0.0)
        with torch.no_grad():  # B = 0 would leave the norm equal to ||W||, whichever way it was found
            for _, layer in dora_layers(model):
                layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
        model.train()(ids).float().square().mean().backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    for name, gradient in gradients[0].items():
        assert torch.allclose(gradients[1][name], gradient, rtol=1e-5, atol=1e-7), name


def test_compile_refuses_what_it_cannot_run_with():
    with pytest.raises(ConfigError, match="'compile' = true runs with strategy 'ddp'"):
        sl.TrainConfig(compile=True, strategy="fsdp")
    with pytest.raises(ConfigError, match="heap_release 'off' or 'steps'"):
        sl.TrainConfig(compile=True, heap_release="layers")
    with pytest.raises(ValueError, match="compiles a Qwen3ForCausalLM's decoder layers; Sequential has none"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
