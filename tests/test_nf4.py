"""The 4-bit base (model/nf4.py): NF4 codes and scales against torchao's NF4Tensor, the layer's forward and backward,
DoRA over it, and a run with base_quant = "nf4" against the same run on the dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint
from torch import nn

import stratos_lite as sl
from stratos_lite.config import ConfigError
from stratos_lite.export.errors import ExportError
from stratos_lite.model.dora import DoRALinear
from stratos_lite.model.folders import load_pretrained_with_adapter
from stratos_lite.model.nf4 import LEVELS, NF4Linear, quantized_layers
from stratos_lite.storage.files import ModelFileError
from stratos_lite.train.builder import prepare_model

nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")


def edge_rows(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows with the cases a quantizer gets wrong among them: zeros, a constant, one huge value among
    small ones, negatives only, and values that sit exactly on NF4 levels."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols)) * 0.02
    weight[1] = 0
    weight[3] = 0.125
    weight[5, 7] = 40.0
    weight[7] = -weight[7].abs()
    weight[9, :64] = torch.tensor(LEVELS).repeat(4) * 0.03
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(128, 128), (256, 192)])
def test_codes_and_scales_equal_torchao(dtype, shape):
    weight = edge_rows(*shape, dtype)
    reference = nf4_tensor.NF4Tensor.from_tensor(weight, 64, 256)
    ours = NF4Linear.from_weight(weight)
    assert torch.equal(ours.codes, reference.quantized_data)
    assert torch.equal(ours.scale_codes, reference.quantized_scalers)
    assert torch.equal(ours.scale_factors, reference.quantization_factor)
    assert torch.equal(ours.scale_mean, reference.scaler_mean)
    assert torch.equal(ours.weight, reference.get_original_weight())


def test_any_shape_round_trips():
    """Sizes torchao refuses (not a multiple of 64 weights, a last group of fewer than 256 scales), and a weight
    whose scales are all equal: each value comes back within half the widest gap between levels of its block's
    scale, and an all-equal group keeps its scale exactly."""
    for shape in [(3, 50), (7, 64), (300, 80)]:
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        layer = NF4Linear.from_weight(weight)
        assert layer.weight.shape == shape
        assert (layer.weight - weight).abs().max() <= 0.17 * weight.abs().max()
    constant = torch.full((4, 64), 0.5)
    assert torch.equal(NF4Linear.from_weight(constant).weight, constant)


def test_rows_are_the_weights_rows():
    weight = torch.randn(10, 48, generator=torch.Generator().manual_seed(2))
    layer = NF4Linear.from_weight(weight)
    for start, end in [(0, 10), (1, 4), (3, 9), (9, 10)]:
        assert torch.equal(layer.rows(start, end), layer.weight[start:end])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_and_backward_are_the_dequantized_linear(dtype):
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(3), dtype=dtype)
    layer = NF4Linear.from_weight(weight)
    x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    reference_x = x.detach().clone().requires_grad_()
    reference = nn.functional.linear(reference_x, layer.weight)
    reference.square().sum().backward()
    assert torch.equal(y, reference)
    assert torch.allclose(x.grad, reference_x.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_dora_over_a_4bit_base_is_dora_over_its_dequantized_weight():
    """The magnitude starts as the row norm of the dequantized W, and output and gradients equal DoRA over a
    plain linear holding the dequantized weight."""
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    quantized = NF4Linear.from_weight(weight)
    plain = nn.Linear(64, 48, bias=False)
    plain.weight.data.copy_(quantized.weight)
    layers = []
    for base in (quantized, plain):
        layer = DoRALinear(nn.Linear(64, 48, bias=False), 4, 8, seed=5)
        layer.base_layer = base.requires_grad_(False)
        layer.reset_adapter()
        with torch.no_grad():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(6))
        layers.append(layer)
    assert torch.allclose(layers[0].lora_magnitude, quantized.weight.norm(dim=1))
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(7))
    outputs = [layer(x) for layer in layers]
    for output in outputs:
        output.square().sum().backward()
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for name in ("lora_A", "lora_B", "lora_magnitude"):
        assert torch.allclose(getattr(layers[0], name).grad, getattr(layers[1], name).grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(layers[0].merged_weight(), layers[1].merged_weight(), rtol=1e-5, atol=1e-6)


def test_settings_refused_in_one_line():
    with pytest.raises(ConfigError, match="mode 'full' trains every weight"):
        sl.TrainConfig(mode="full", base_quant="nf4")
    with pytest.raises(ConfigError, match=r"'base_quant' = 'int4'.*one of 'none', 'nf4'"):
        sl.TrainConfig(base_quant="int4")
    with pytest.raises(ConfigError, match="strategy 'ddp'"):
        sl.TrainConfig(base_quant="nf4", strategy="fsdp")


def test_a_quantized_folder_is_refused(tmp_path):
    folder = tmp_path / "gptq"
    write_hf_checkpoint(folder, tiny_config())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"config.json: the folder holds a gptq-quantized model"):
        prepare_model(sl.TrainConfig(model=str(folder), base_quant="nf4"), torch.device("cpu"))


def test_loading_quantizes_the_targets_only(tmp_path):
    folder = tmp_path / "base"
    write_hf_checkpoint(folder, tiny_config())
    model = prepare_model(sl.TrainConfig(model=str(folder), base_quant="nf4", dtype="float32"), torch.device("cpu"))
    plain = sl.load_model(folder, dtype=torch.float32)
    layers = quantized_layers(model)
    assert len(layers) == 7 * len(model.model.layers)
    for name, layer in layers.items():
        weight = plain.get_submodule(name.replace(".base_layer", "")).weight
        assert torch.equal(layer.weight, NF4Linear.from_weight(weight).weight)
    assert model.lm_head.weight.dtype == torch.float32 and not quantized_layers(model.lm_head)
    assert torch.equal(model.model.embed_tokens.weight, plain.model.embed_tokens.weight)


def dequantized_folder(source, folder) -> None:
    """`source`'s model with every target weight replaced by its NF4 round trip, as a plain folder."""
    model = sl.load_model(source, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in sl.TrainConfig().targets:
                module.weight.copy_(NF4Linear.from_weight(module.weight).weight)
    sl.save_pretrained(model, sl.Tokenizer.from_pretrained(source), folder)


@pytest.mark.parametrize("settings", [dict(checkpoint_policy="layer"), dict(checkpoint_policy="mlp"),
                                      dict(packing=True, pack_tokens=600)], ids=["layer", "mlp", "packed"])
def test_a_run_on_a_4bit_base_is_the_run_on_its_dequantized_weights(demo_dir, tmp_path, settings):
    """base_quant = "nf4" quantizes while loading and dequantizes as each layer computes: the losses, gradient
    norms and adapter are those of the same run on a folder holding the dequantized weights."""
    from test_trainer import quick_config
    from train_child import save_base

    save_base(str(demo_dir), tmp_path / "base")
    dequantized_folder(tmp_path / "base", tmp_path / "dequantized")
    tokenizer = sl.Tokenizer.from_pretrained(demo_dir / "tokenizer")
    dataset = sl.ScoredDataset.from_jsonl(demo_dir / "train.jsonl", tokenizer, max_len=256)
    runs = []
    for folder, quant in [(tmp_path / "base", "nf4"), (tmp_path / "dequantized", "none")]:
        config = quick_config(tmp_path / quant, model=str(folder), base_quant=quant, rank=4, alpha=8,
                              max_steps=3, gradient_checkpointing=True, **settings)
        model = prepare_model(config, torch.device("cpu"))
        sl.Trainer(model, dataset, config, pad_id=tokenizer.pad_id).train()
        records = [json.loads(line) for line in (tmp_path / quant / "metrics.jsonl").read_text().splitlines()]
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append(([(r["loss"], r["grad_norm"]) for r in records], adapter))
    (quantized, quantized_adapter), (plain, plain_adapter) = runs
    assert len(quantized) == 3 and quantized == pytest.approx(plain, rel=1e-5)
    assert quantized_adapter.keys() == plain_adapter.keys()
    for name, tensor in plain_adapter.items():
        assert torch.allclose(quantized_adapter[name], tensor, rtol=1e-4, atol=1e-6), name


def test_an_adapter_loads_on_its_4bit_base_and_ships_on_the_full_one(tmp_path, tokenizer):
    """evaluate --base-quant nf4 rebuilds the model a run trained (the same logits); merging or exporting that
    model is refused in one line, and the adapter merges into the folder's own weights instead."""
    folder = tmp_path / "base"
    write_hf_checkpoint(folder, tiny_config())
    tokenizer.save_pretrained(folder)
    config = sl.TrainConfig(model=str(folder), base_quant="nf4", dtype="float32", rank=4, alpha=8)
    trained = prepare_model(config, torch.device("cpu")).eval()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    sl.save_adapter(trained, tmp_path / "adapter")
    with pytest.raises(ExportError, match="base is 4-bit"):
        sl.export_gguf(trained, tokenizer, tmp_path / "refused.gguf")
    with pytest.raises(ValueError, match="base is 4-bit"):
        sl.merge_dora(trained)
    reloaded, _ = load_pretrained_with_adapter(folder, tmp_path / "adapter", torch.float32, base_quant="nf4")
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), trained(ids))
    full, _ = load_pretrained_with_adapter(folder, tmp_path / "adapter", torch.float32)
    assert not quantized_layers(full) and not quantized_layers(sl.merge_dora(full))
    assert not (tmp_path / "refused.gguf").exists()
