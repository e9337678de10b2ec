"""GGUF export: read back with gguf-py, q8_0 byte-identical to gguf.quants, and run in llama.cpp."""

import llama_oracle
import numpy as np
import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint
from isolation import call_in_child

import stratos_lite as sl
from stratos_lite.export.errors import ExportError
from stratos_lite.export.gguf_file import RowBlocks, export_gguf, export_gguf_from_folder, quantize_q8_0

gguf = pytest.importorskip("gguf")
TOKENS = list(range(3, 200, 3))  # 66 positions


def q8_reference(x: torch.Tensor) -> np.ndarray:
    return gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)


@pytest.mark.parametrize("case", ["random", "zeros", "constant", "large", "half-steps", "mixed"])
def test_q8_0_bytes_equal_gguf_reference(case):
    gen = torch.Generator().manual_seed(0)
    x = {
        "random": torch.randn(130, 96, generator=gen),
        "zeros": torch.zeros(5, 64),
        "constant": torch.full((4, 64), -0.37),
        "large": torch.randn(16, 128, generator=gen) * 3e4,
        "half-steps": ((torch.arange(128.0) - 63.5) / 127).reshape(4, 32) * 2,  # exact .5 ties after scaling
        "mixed": torch.cat([torch.zeros(3, 32), torch.randn(3, 32, generator=gen) * 1e-6, torch.ones(3, 32)]),
    }[case]
    assert np.array_equal(quantize_q8_0(x), q8_reference(x))
    assert np.array_equal(quantize_q8_0(RowBlocks.of_tensor(x, block_rows=3)), q8_reference(x))  # any block edges


def model_for(tmp_path, **overrides):
    write_hf_checkpoint(tmp_path / "hf", tiny_config(**overrides))
    return sl.load_model(tmp_path / "hf", dtype=torch.float32)


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))] if hasattr(f, "contents") else f
    return f.parts[f.data[0]][0]


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_reader_sees_metadata_and_tensors(tmp_path, tokenizer, quant):
    model = model_for(tmp_path, head_dim=24, tie_word_embeddings=quant == "bf16")
    path = export_gguf(model, tokenizer, tmp_path / f"m-{quant}.gguf", quant=quant)
    reader = gguf.GGUFReader(path)
    c = model.config
    assert field(reader, "general.architecture") == "qwen3"
    expected = {"qwen3.block_count": 2, "qwen3.embedding_length": 64, "qwen3.feed_forward_length": 96,
                "qwen3.attention.head_count": 4, "qwen3.attention.head_count_kv": 2,
                "qwen3.attention.key_length": 24, "qwen3.attention.value_length": 24,
                "qwen3.context_length": c.max_position_embeddings, "general.quantization_version": 2,
                "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[quant],
                "tokenizer.ggml.eos_token_id": tokenizer.eos_id, "tokenizer.ggml.padding_token_id": tokenizer.pad_id}
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "qwen3.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(reader, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert bool(field(reader, "tokenizer.ggml.add_bos_token")) is False
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 11 * 2 + (0 if c.tie_word_embeddings else 1)
    assert ("output.weight" in tensors) != c.tie_word_embeddings
    for name, source in [("token_embd.weight", model.model.embed_tokens.weight),
                         ("blk.1.attn_q.weight", model.model.layers[1].self_attn.q_proj.weight),
                         ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
                         ("blk.0.attn_k_norm.weight", model.model.layers[0].self_attn.k_norm.weight),
                         ("output_norm.weight", model.model.norm.weight)]:
        tensor = tensors[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(source.shape)
        want = source.detach()
        if source.dim() == 1 or quant == "f32":
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(values, want.numpy())
        elif quant == "q8_0":
            assert np.array_equal(np.asarray(tensor.data).reshape(-1), q8_reference(want).reshape(-1))
            assert np.abs(values - want.numpy()).max() <= want.abs().max().item() / 127
        else:
            assert np.array_equal(values, want.to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[quant]))
                                  .float().numpy())


def test_tokenizer_metadata(tmp_path, tokenizer):
    model = model_for(tmp_path)
    reader = gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32"))
    tokens_field, types_field = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    tokens = [bytes(tokens_field.parts[i]).decode() for i in tokens_field.data]
    types = [int(types_field.parts[i][0]) for i in types_field.data]
    assert len(tokens) == model.config.vocab_size == 512 and len(set(tokens)) == len(tokens)
    ids = {t: i for i, t in enumerate(tokens)}
    assert types[ids["<|im_start|>"]] == gguf.TokenType.CONTROL
    assert types[ids["<|endoftext|>"]] == gguf.TokenType.CONTROL
    assert types[ids["<think>"]] == gguf.TokenType.USER_DEFINED
    assert tokens[-1] == "[PAD511]" and types[-1] == gguf.TokenType.UNUSED
    assert ids["<|im_end|>"] == tokenizer.im_end_id
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 0
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


LLAMA_CASES = {
    "untied-gqa2-headdim": dict(head_dim=32, intermediate_size=128),
    "tied-mha": dict(tie_word_embeddings=True, num_key_value_heads=4, intermediate_size=128),
    "untied-gqa4": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=128),
}


def give_clear_favourites_(model):
    """Random tiny models have near-tied top logits, so any rounding flips their argmax; a trained model
    has a clear favourite. Large embeddings read back through the output projection give one."""
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.copy_(model.model.embed_tokens.weight + 0.05 * torch.randn_like(model.lm_head.weight))


@pytest.mark.parametrize("name", LLAMA_CASES)
def test_llama_cpp_runs_the_export_and_logits_match(tmp_path, tokenizer, name):
    model = model_for(tmp_path, **LLAMA_CASES[name])
    give_clear_favourites_(model)
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS]))[0].numpy()
    f32_path = export_gguf(model, tokenizer, tmp_path / "f32.gguf", quant="f32")
    f32 = call_in_child(llama_oracle.logits, f32_path, TOKENS, f32_cache=True)
    assert np.abs(f32 - ours).max() / np.abs(ours).max() < 1e-3
    q8_path = export_gguf(model, tokenizer, tmp_path / "q8.gguf", quant="q8_0")
    q8 = call_in_child(llama_oracle.logits, q8_path, TOKENS, f32_cache=False)
    assert np.abs(q8 - ours).max() / np.abs(ours).max() < 5e-2
    assert (q8.argmax(-1) == ours.argmax(-1)).mean() >= 0.95


def test_unmerged_dora_export_equals_merged_export(tmp_path, tokenizer):
    model = model_for(tmp_path)
    sl.apply_dora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    sl.save_adapter(model, tmp_path / "adapter")
    unmerged = export_gguf(model, tokenizer, tmp_path / "unmerged.gguf", quant="q8_0").read_bytes()
    sl.merge_dora(model)
    assert export_gguf(model, tokenizer, tmp_path / "merged.gguf", quant="q8_0").read_bytes() == unmerged
    sl.save_pretrained(model_for(tmp_path / "again"), tokenizer, tmp_path / "base")
    from_folder = export_gguf_from_folder(tmp_path / "base", tmp_path / "folder.gguf", tmp_path / "adapter",
                                          quant="q8_0")
    assert from_folder.read_bytes() == unmerged  # same base weights (same seed), same adapter


def test_non_finite_weight_is_refused_and_nothing_written(tmp_path, tokenizer):
    model = model_for(tmp_path)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ExportError, match=r"tensor blk\.1\.ffn_up\.weight: non-finite value"):
        export_gguf(model, tokenizer, tmp_path / "bad.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_unsupported_model_and_quant_are_refused(tmp_path, tokenizer):
    with pytest.raises(ExportError, match="only Qwen3ForCausalLM"):
        export_gguf(torch.nn.Linear(2, 2), tokenizer, tmp_path / "x.gguf", quant="f32")
    with pytest.raises(ExportError, match="quant must be one of"):
        export_gguf(model_for(tmp_path), tokenizer, tmp_path / "x.gguf", quant="q4_k")


def test_export_tool(tmp_path, tokenizer):
    import subprocess
    import sys

    sl.save_pretrained(model_for(tmp_path), tokenizer, tmp_path / "base")
    subprocess.run([sys.executable, "tools/export_gguf.py", "--model", str(tmp_path / "base"), "--out",
                    str(tmp_path / "out" / "m.gguf"), "--quant", "q8_0"], check=True)
    reader = gguf.GGUFReader(tmp_path / "out" / "m.gguf")
    assert len(reader.tensors) == 25
    assert 'SYSTEM """You score how relevant' in (tmp_path / "out" / "Modelfile").read_text()
