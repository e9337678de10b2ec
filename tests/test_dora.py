"""DoRA against PEFT (the oracle): layer outputs and gradients, adapter files both ways, merging."""

import json
from collections import OrderedDict

import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint
from torch import nn

import stratos_lite as sl
from stratos_lite.model.dora import DoRALinear, apply_dora, merge_dora
from stratos_lite.model.lora import adapters_disabled
from stratos_lite.model.peft_files import load_adapter, save_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_config(**overrides):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_dora": True,
                         "target_modules": TARGETS, **overrides})


def perturb_(params, seed=0, scale=0.1):
    """Non-zero B (and moved A, m), so that every DoRA term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.abs().mean() + 0.5))


def peft_layer(base: nn.Linear, **config):
    from peft import get_peft_model

    wrapped = get_peft_model(nn.Sequential(OrderedDict(proj=base)), peft_config(target_modules=["proj"], **config))
    layer = wrapped.base_model.model.proj
    return wrapped, layer.lora_A["default"].weight, layer.lora_B["default"].weight, \
        layer.lora_magnitude_vector["default"].weight


def test_layer_forward_and_gradients_match_peft():
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=False)
    ours = DoRALinear(nn.Linear(48, 40, bias=False), rank=4, alpha=8)
    with torch.no_grad():
        ours.base_layer.weight.copy_(base.weight)
    reference, a, b, m = peft_layer(base)
    perturb_([a, b, m])
    with torch.no_grad():
        ours.lora_A.copy_(a), ours.lora_B.copy_(b), ours.lora_magnitude.copy_(m)
    assert_same_layer(ours, reference, [(ours.lora_A, a), (ours.lora_B, b), (ours.lora_magnitude, m)])


def assert_same_layer(ours: nn.Module, reference: nn.Module, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Our layer against PEFT's on one input of (3, 7, 48): the outputs, the input's gradient and each
    (ours, theirs) parameter pair's gradient agree. Returns the input and the reference's output."""
    x = torch.randn(3, 7, 48)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), reference(x_ref)
    assert (y_ours - y_ref).abs().max() < 1e-5
    grad_out = torch.randn(y_ref.shape)
    (y_ours * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    for got, want in [*((mine.grad, theirs.grad) for mine, theirs in pairs), (x_ours.grad, x_ref.grad)]:
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    return x, y_ref.detach()


def test_weight_norm_closed_form_tracks_parameter_updates():
    layer = DoRALinear(nn.Linear(32, 24, bias=False), rank=4, alpha=16)
    perturb_([layer.lora_B, layer.lora_A], seed=1)
    direct = lambda: torch.linalg.vector_norm(
        layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    assert torch.allclose(layer.weight_norm(), direct(), rtol=1e-5)
    with torch.no_grad():
        layer.lora_B.mul_(3)  # an optimizer step changes B in place: the cached norm must follow
    assert torch.allclose(layer.weight_norm(), direct(), rtol=1e-5)


def test_dropout_touches_only_the_adapter_path():
    layer = DoRALinear(nn.Linear(32, 24, bias=False), rank=4, alpha=8, dropout=0.5).train()
    x = torch.randn(5, 32)
    # B is zero at init, so with any dropout mask the output is exactly the (m/n-scaled) base output.
    expected = layer.base_layer(x) * (layer.lora_magnitude / layer.weight_norm())
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_dora_model_cross_loads_with_peft(tmp_path):
    from peft import PeftModel, get_peft_model

    config = tiny_config(head_dim=24)
    hf = write_hf_checkpoint(tmp_path / "base", config)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))

    # PEFT saves, we load.
    theirs = get_peft_model(hf, peft_config())
    perturb_([p for n, p in theirs.named_parameters() if "lora_" in n], seed=2)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    with torch.no_grad():
        expected = theirs(ids).logits
    model = sl.load_model(tmp_path / "base", dtype=torch.float32)
    load_adapter(model, tmp_path / "peft_adapter")
    with torch.no_grad():
        assert (model(ids) - expected).abs().max() < 1e-4

    # We save, PEFT loads.
    ours = sl.load_model(tmp_path / "base", dtype=torch.float32)
    summary = apply_dora(ours, rank=4, alpha=8, dropout=0.0)
    assert summary.layers == 14 and 0 < summary.trainable < summary.total
    perturb_([p for p in ours.parameters() if p.requires_grad], seed=3)
    save_adapter(ours, tmp_path / "our_adapter", base_model_name_or_path=str(tmp_path / "base"))
    saved = json.loads((tmp_path / "our_adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["r"] == 4 and saved["target_modules"] == sorted(TARGETS)
    fresh = write_hf_checkpoint(tmp_path / "base2", config)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "our_adapter").eval()
    with torch.no_grad():
        assert (loaded(ids).logits - ours(ids)).abs().max() < 1e-4


def test_merge_matches_unmerged_and_peft_merge_and_unload(tmp_path):
    import transformers
    from peft import get_peft_model

    config = tiny_config(tie_word_embeddings=True, num_key_value_heads=1)
    hf = write_hf_checkpoint(tmp_path / "base", config)
    theirs = get_peft_model(hf, peft_config())
    perturb_([p for n, p in theirs.named_parameters() if "lora_" in n], seed=4)
    theirs.save_pretrained(tmp_path / "adapter")
    model = sl.load_model(tmp_path / "base", dtype=torch.float32)
    load_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(ids)
        merge_dora(model)
        merged = model(ids)
        peft_merged = theirs.merge_and_unload()(ids).logits
    assert not any(isinstance(m, DoRALinear) for m in model.modules())
    assert (merged - unmerged).abs().max() < 1e-4
    assert (merged - peft_merged).abs().max() < 1e-4
    sl.save_pretrained(model, None, tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert (reloaded(ids).logits - merged).abs().max() < 1e-5


def test_adapters_off_is_the_base_model_exactly(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config())
    base = sl.load_model(tmp_path, dtype=torch.float32)
    model = sl.load_model(tmp_path, dtype=torch.float32)
    apply_dora(model, rank=4, alpha=8)
    perturb_([p for p in model.parameters() if p.requires_grad], seed=5)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        on = model(ids)
        with adapters_disabled(model):
            off = model(ids)
        assert torch.equal(off, base(ids))
        assert not torch.allclose(on, off)
        assert torch.equal(model(ids), on)  # the switch is restored on exit


def test_save_pretrained_refuses_unmerged_adapters(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config())
    model = sl.load_model(tmp_path, dtype=torch.float32)
    apply_dora(model, rank=2, alpha=4)
    with pytest.raises(sl.ModelFileError, match="merge_adapters"):
        sl.save_pretrained(model, None, tmp_path / "out")


# Bad input: one clear error.

def test_adapter_with_wrong_shapes(tmp_path):
    write_hf_checkpoint(tmp_path / "small", tiny_config())
    write_hf_checkpoint(tmp_path / "wide", tiny_config(intermediate_size=128))
    wide = sl.load_model(tmp_path / "wide", dtype=torch.float32)
    apply_dora(wide, rank=4, alpha=8)
    save_adapter(wide, tmp_path / "adapter")
    small = sl.load_model(tmp_path / "small", dtype=torch.float32)
    with pytest.raises(sl.ModelFileError, match=r"gate_proj\.lora_B\.weight' has shape \(128, 4\)"):
        load_adapter(small, tmp_path / "adapter")


def test_adapter_with_unknown_target_modules(tmp_path):
    write_hf_checkpoint(tmp_path / "base", tiny_config())
    model = sl.load_model(tmp_path / "base", dtype=torch.float32)
    apply_dora(model, rank=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = ["q_proj", "c_attn"]
    path.write_text(json.dumps(config))
    with pytest.raises(sl.ModelFileError, match=r"\['c_attn'\] match no linear layer"):
        load_adapter(sl.load_model(tmp_path / "base", dtype=torch.float32), tmp_path / "adapter")


@pytest.mark.parametrize("config, problem", [({"peft_type": "IA3"}, "peft_type LORA"),
                                             ({"peft_type": "LORA", "use_dora": False}, "needs r, lora_alpha")])
def test_an_adapter_config_of_another_kind_is_refused(tmp_path, config, problem):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(sl.ModelFileError, match=problem):
        load_adapter(nn.Linear(2, 2), tmp_path)


def test_merge_tool_writes_merged_folder(tmp_path, tokenizer):
    import subprocess
    import sys

    write_hf_checkpoint(tmp_path / "hf", tiny_config())
    base = sl.load_model(tmp_path / "hf", dtype=torch.float32)
    sl.save_pretrained(base, tokenizer, tmp_path / "base")  # a base folder with its tokenizer
    apply_dora(base, rank=4, alpha=8)
    perturb_([p for p in base.parameters() if p.requires_grad], seed=6)
    save_adapter(base, tmp_path / "adapter")
    subprocess.run([sys.executable, "tools/merge.py", "--base", str(tmp_path / "base"), "--adapter",
                    str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--dtype", "float32"], check=True)
    merged, tok = sl.load_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (merged(ids) - base(ids)).abs().max() < 1e-4
    assert tok.encode("Kuwait oil") == tokenizer.encode("Kuwait oil")


def test_inference_path_equals_training_path():
    layer = DoRALinear(nn.Linear(32, 24, bias=False), rank=4, alpha=8, dropout=0.1).eval()
    perturb_([layer.lora_A, layer.lora_B, layer.lora_magnitude], seed=7)
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        fast = layer(x)
    assert torch.allclose(fast, layer(x), atol=1e-6)  # grad enabled: the autograd path
    with torch.no_grad():
        layer.lora_magnitude.mul_(2)  # a changed magnitude must invalidate the folded terms
        assert torch.allclose(layer(x), 2 * fast, atol=1e-5)


def test_adapter_dropout_keeps_the_right_share_and_rescales():
    from stratos_lite.model.lora import adapter_dropout

    torch.manual_seed(0)
    x = torch.ones(400, 500)
    dropped, rescale = adapter_dropout(x, 0.1)
    kept = (dropped != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.005 and rescale == pytest.approx(1 / 0.9)
    assert abs((dropped * rescale).mean().item() - 1.0) < 0.01  # unbiased, like F.dropout
    torch.manual_seed(0)
    assert torch.equal(adapter_dropout(x, 0.1)[0], dropped)  # reproducible from the RNG state
    assert adapter_dropout(x, 0.0) == (x, 1.0)
