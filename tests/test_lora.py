"""LoRA against PEFT (outputs, gradients, files both ways, merges) and its GGUF adapter against llama.cpp (the
adapter applied at load time equals our merged export of the same adapter)."""

import copy
import json
import subprocess
import sys
from collections import OrderedDict

import llama_oracle
import numpy as np
import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint
from isolation import call_in_child
from test_dora import TARGETS, assert_same_layer, perturb_
from torch import nn

import stratos_lite as sl
from stratos_lite.export.errors import ExportError
from stratos_lite.model.lora import LoRALinear
from stratos_lite.storage.files import ModelFileError
from stratos_lite.train.builder import prepare_model

gguf = pytest.importorskip("gguf")


def lora_config(**overrides):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS, **overrides})


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_layer_forward_and_gradients_match_peft(rslora):
    from peft import get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=False)
    ours = LoRALinear(nn.Linear(48, 40, bias=False), rank=4, alpha=8, rslora=rslora)
    reference = get_peft_model(nn.Sequential(OrderedDict(proj=base)),
                               lora_config(target_modules=["proj"], use_rslora=rslora))
    theirs = reference.base_model.model.proj
    a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    perturb_([a, b])
    with torch.no_grad():
        ours.base_layer.weight.copy_(base.weight), ours.lora_A.copy_(a), ours.lora_B.copy_(b)
    assert ours.scaling == pytest.approx(theirs.scaling["default"])
    x, y_ref = assert_same_layer(ours, reference, [(ours.lora_A, a), (ours.lora_B, b)])
    with torch.no_grad():  # the inference path (folded terms) gives the training path's output
        assert (ours.eval()(x) - y_ref).abs().max() < 1e-5


def test_a_new_adapter_leaves_the_model_as_it_was_and_dropout_touches_only_the_adapter():
    layer = LoRALinear(nn.Linear(32, 24, bias=False), rank=4, alpha=8, dropout=0.5).train()
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), layer.base_layer(x))  # B is zero: any dropout mask gives W x
    assert "lora_magnitude" not in dict(layer.named_parameters())


@pytest.mark.parametrize("layer_class", [LoRALinear, sl.DoRALinear], ids=["lora", "dora"])
def test_a_reset_starts_the_layer_again_from_its_own_seed(layer_class):
    layer = layer_class(nn.Linear(32, 24, bias=False), rank=4, alpha=8, seed=11)
    start = {name: p.detach().clone() for name, p in layer.named_parameters() if p.requires_grad}
    assert torch.equal(start["lora_A"], layer_class(nn.Linear(32, 24, bias=False), 4, 8, seed=11).lora_A)
    assert not torch.equal(start["lora_A"], layer_class(nn.Linear(32, 24, bias=False), 4, 8, seed=12).lora_A)
    perturb_([p for p in layer.parameters() if p.requires_grad])
    torch.rand(100)  # the global generator moves on: the layer's start does not depend on it
    layer.reset_adapter()
    for name, tensor in start.items():
        assert torch.equal(getattr(layer, name), tensor), name


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_lora_model_cross_loads_with_peft(tmp_path, rslora):
    from peft import PeftModel, get_peft_model

    config = tiny_config(head_dim=24)
    hf = write_hf_checkpoint(tmp_path / "base", config)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))

    theirs = get_peft_model(hf, lora_config(use_rslora=rslora))  # PEFT saves, we load
    perturb_([p for n, p in theirs.named_parameters() if "lora_" in n], seed=2)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    with torch.no_grad():
        expected = theirs(ids).logits
    model = sl.load_model(tmp_path / "base", dtype=torch.float32)
    summary = sl.load_adapter(model, tmp_path / "peft_adapter")
    assert summary.kind == "LoRA" and str(summary).startswith("LoRA on 14 linears")
    with torch.no_grad():
        assert (model(ids) - expected).abs().max() < 1e-4

    ours = sl.load_model(tmp_path / "base", dtype=torch.float32)  # we save, PEFT loads
    sl.apply_lora(ours, rank=4, alpha=8, dropout=0.0, rslora=rslora)
    perturb_([p for p in ours.parameters() if p.requires_grad], seed=3)
    sl.save_adapter(ours, tmp_path / "our_adapter", base_model_name_or_path=str(tmp_path / "base"))
    saved = json.loads((tmp_path / "our_adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is False and saved["use_rslora"] is rslora and saved["r"] == 4
    loaded = PeftModel.from_pretrained(write_hf_checkpoint(tmp_path / "base2", config), tmp_path / "our_adapter")
    with torch.no_grad():
        assert (loaded.eval()(ids).logits - ours(ids)).abs().max() < 1e-4


def test_merge_matches_unmerged_and_peft_merge_and_unload(tmp_path):
    from peft import get_peft_model

    hf = write_hf_checkpoint(tmp_path / "base", tiny_config(tie_word_embeddings=True, num_key_value_heads=1))
    theirs = get_peft_model(hf, lora_config())
    perturb_([p for n, p in theirs.named_parameters() if "lora_" in n], seed=4)
    theirs.save_pretrained(tmp_path / "adapter")
    model = sl.load_model(tmp_path / "base", dtype=torch.float32)
    sl.load_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(ids)
        sl.merge_adapters(model)
        merged = model(ids)
        peft_merged = theirs.merge_and_unload()(ids).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (merged - unmerged).abs().max() < 1e-4 and (merged - peft_merged).abs().max() < 1e-4


def test_an_adapter_of_the_other_kind_or_scaling_is_refused(tmp_path):
    write_hf_checkpoint(tmp_path / "base", tiny_config())
    for kind, apply in [("dora", sl.apply_dora), ("lora", sl.apply_lora)]:
        model = sl.load_model(tmp_path / "base", dtype=torch.float32)
        apply(model, rank=4, alpha=8)
        sl.save_adapter(model, tmp_path / kind)
    lora_model = sl.load_model(tmp_path / "base", dtype=torch.float32)
    sl.apply_lora(lora_model, rank=4, alpha=8)
    with pytest.raises(ModelFileError, match=r"a DoRA adapter \(use_dora true\), but the model's layers are LoRA"):
        sl.load_adapter(lora_model, tmp_path / "dora")
    dora_model = sl.load_model(tmp_path / "base", dtype=torch.float32)
    sl.apply_dora(dora_model, rank=4, alpha=8)
    with pytest.raises(ModelFileError, match=r"a LoRA adapter \(use_dora false\), but the model's layers are DoRA"):
        sl.load_adapter(dora_model, tmp_path / "lora")
    rslora_model = sl.load_model(tmp_path / "base", dtype=torch.float32)
    sl.apply_lora(rslora_model, rank=4, alpha=8, rslora=True)
    with pytest.raises(ModelFileError, match=r"scaling 2 .* scale by 4"):
        sl.load_adapter(rslora_model, tmp_path / "lora")


def test_a_lora_run_trains_and_ships_its_adapter(demo_dir, tmp_path):
    """mode = "lora" through the one builder and the Trainer, with packing and checkpointing: the adapter it
    writes is PEFT's LoRA, and loads back to the model that trained."""
    from test_trainer import quick_config
    from train_child import save_base

    save_base(str(demo_dir), tmp_path / "base")
    tokenizer = sl.Tokenizer.from_pretrained(demo_dir / "tokenizer")
    dataset = sl.ScoredDataset.from_jsonl(demo_dir / "train.jsonl", tokenizer, max_len=256)
    config = quick_config(tmp_path / "run", model=str(tmp_path / "base"), mode="lora", rank=4, alpha=8, lr=5e-3,
                          max_steps=4, gradient_checkpointing=True, packing=True, pack_tokens=600)
    model = prepare_model(config, torch.device("cpu"))
    assert {layer.kind for layer in model.modules() if isinstance(layer, LoRALinear)} == {"LoRA"}
    result = sl.Trainer(model, dataset, config, pad_id=tokenizer.pad_id).train()
    assert result.steps == 4 and np.isfinite(result.final_loss)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is False
    reloaded = sl.load_model(tmp_path / "base", dtype=torch.float32)
    sl.load_adapter(reloaded, tmp_path / "run" / "adapter")
    ids = torch.randint(0, tokenizer.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model.eval()(ids)
        assert torch.equal(reloaded(ids), trained)
        with sl.adapters_disabled(model):
            assert not torch.equal(model(ids), trained)  # the adapter learned something


TOKENS = list(range(3, 120, 3))


def tiny_base(tmp_path):
    """A tiny Qwen3 with a clear favourite at every position (the same weights on every call)."""
    from test_gguf import give_clear_favourites_

    write_hf_checkpoint(tmp_path / "hf", tiny_config(head_dim=32, intermediate_size=128))
    model = sl.load_model(tmp_path / "hf", dtype=torch.float32)
    torch.manual_seed(0)
    give_clear_favourites_(model)
    return model.eval()


def lora_model(tmp_path, rslora=False):
    """tiny_base with a trained-looking LoRA adapter (non-zero B)."""
    model = tiny_base(tmp_path)
    sl.apply_lora(model, rank=4, alpha=8, rslora=rslora)
    perturb_([p for p in model.parameters() if p.requires_grad], seed=5, scale=0.3)
    return model.eval()


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_the_adapter_gguf_in_llama_cpp_equals_our_merged_export(tmp_path, tokenizer, rslora):
    """llama.cpp with the adapter over the f32 base gives the logits and greedy tokens of llama.cpp on the merged
    model we export, which are the torch model's."""
    model = lora_model(tmp_path, rslora)
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS]))[0].numpy()
        with sl.adapters_disabled(model):
            base_only = model(torch.tensor([TOKENS]))[0].numpy()
    base = sl.export_gguf(tiny_base(tmp_path), tokenizer, tmp_path / "base.gguf", quant="f32")
    adapter = sl.export_lora_gguf(model, tmp_path / "adapter.gguf", base, dtype="f32")
    merged = sl.export_gguf(sl.merge_adapters(copy.deepcopy(model)), tokenizer, tmp_path / "merged.gguf", quant="f32")
    with_adapter = call_in_child(llama_oracle.logits, base, TOKENS, f32_cache=True, lora=adapter)
    from_merged = call_in_child(llama_oracle.logits, merged, TOKENS, f32_cache=True)
    scale = np.abs(ours).max()
    assert np.abs(with_adapter - from_merged).max() / scale < 1e-3
    assert np.abs(with_adapter - ours).max() / scale < 1e-3
    assert np.abs(base_only - ours).max() / scale > 1e-2  # the adapter changes the logits: the check has teeth
    prompt = TOKENS[:8]
    assert call_in_child(llama_oracle.greedy, base, prompt, 12, lora=adapter) == \
        call_in_child(llama_oracle.greedy, merged, prompt, 12)


def test_the_adapter_gguf_layout(tmp_path, tokenizer):
    model = lora_model(tmp_path, rslora=True)
    base = sl.export_gguf(tiny_base(tmp_path), tokenizer, tmp_path / "base.gguf", quant="q8_0",
                          system_prompt="Score it.")
    adapter = sl.export_lora_gguf(model, tmp_path / "lora" / "adapter.gguf", base, system_prompt="Score it.")
    reader = gguf.GGUFReader(adapter)
    fields = {key: reader.fields[key].contents() for key in
              ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")}
    assert fields == {"general.architecture": "qwen3", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": pytest.approx(8 / 2 * 4)}  # llama.cpp's alpha / r = rsLoRA's 8 / sqrt(4)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 7 * model.config.num_hidden_layers
    q = model.model.layers[1].self_attn.q_proj
    a, b = tensors["blk.1.attn_q.weight.lora_a"], tensors["blk.1.attn_q.weight.lora_b"]
    assert a.tensor_type == gguf.GGMLQuantizationType.F16 and list(a.shape) == [q.base_layer.in_features, 4]
    assert list(b.shape) == [4, q.base_layer.out_features]
    assert np.allclose(np.asarray(a.data, dtype=np.float32), q.lora_A.detach().numpy(), atol=1e-3)
    modelfile = (tmp_path / "lora" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ../base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE") and "Score it." in modelfile


def test_what_cannot_ship_as_an_adapter_is_refused_in_one_line(tmp_path, tokenizer):
    model = lora_model(tmp_path)
    other = tmp_path / "other"
    write_hf_checkpoint(other / "hf", tiny_config(hidden_size=96, head_dim=32, intermediate_size=128))
    wrong_base = sl.export_gguf(sl.load_model(other / "hf", dtype=torch.float32), tokenizer, other / "b.gguf", "f32")
    with pytest.raises(ExportError, match=r"b.gguf: tensor blk.0.attn_q.weight: the adapter updates a \(128, 64\)"):
        sl.export_lora_gguf(model, tmp_path / "refused.gguf", wrong_base)
    dora = sl.load_model(tmp_path / "hf", dtype=torch.float32)
    sl.apply_dora(dora, rank=4, alpha=8)
    sl.save_adapter(dora, tmp_path / "dora_adapter")
    sl.save_pretrained(sl.load_model(tmp_path / "hf", dtype=torch.float32), tokenizer, tmp_path / "base")
    run = subprocess.run([sys.executable, "-m", "stratos_lite", "export", "--model", str(tmp_path / "base"),
                          "--adapter", str(tmp_path / "dora_adapter"), "--adapter-only", "--base-gguf",
                          str(wrong_base), "--out", str(tmp_path / "refused.gguf")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0
    assert run.stderr.startswith("error: a DoRA adapter cannot ship as a llama.cpp adapter") and "merged" in run.stderr
    assert not (tmp_path / "refused.gguf").exists()
