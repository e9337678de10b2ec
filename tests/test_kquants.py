"""K-quant GGUF exports (q3_k_m, q4_k_m, q5_k_m, q6_k), with and without an importance matrix, against
llama.cpp's own quantizer, tensor by tensor."""

import warnings

import llama_oracle
import numpy as np
import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint
from isolation import call_in_child

import stratos_lite as sl
from stratos_lite.export.errors import ExportError
from stratos_lite.export.gguf_file import export_gguf, export_gguf_from_folder
from stratos_lite.export.imatrix import product_modules
from stratos_lite.export.imatrix_file import ImportanceMatrix
from stratos_lite.export.kquants import quantize_k
from stratos_lite.export.quant_types import QuantFallbackWarning, tensor_type, use_more_bits

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
PRESETS = {"q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
           "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M, "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}
TOKENS = list(range(3, 200, 3))
# Rows of 256 so every K type holds them; 8 layers so the _M presets' layer pattern shows (layers 0, 3, 6, 7).
WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64)


def base_model(tmp_path, seed=0, **overrides):
    """A tiny Qwen3 with a few rows the quantizers treat specially: all zeros, constant, negative only, tiny
    and large values; and large embeddings, so that each position has a clear favourite token."""
    write_hf_checkpoint(tmp_path / "hf", tiny_config(**overrides), seed=seed)
    model = sl.load_model(tmp_path / "hf", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1, generator=gen)
        up = model.model.layers[0].mlp.up_proj.weight
        up[0], up[1], up[2] = 0.0, 0.37, -up[2].abs()
        up[3] *= 1e-6
        up[4] *= 1e4
    return model


def with_adapters_(model, seed=0):
    """DoRA on every linear, with trained-looking adapters (non-zero B, moved magnitudes), left unmerged."""
    sl.apply_dora(model, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return model


def dora_model(tmp_path, seed=0, **overrides):
    return with_adapters_(base_model(tmp_path, seed, **overrides), seed)


def blocks_of(tensor) -> np.ndarray:
    size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
    return np.asarray(tensor.data).reshape(-1, size)


def block_errors(tensor, reference: np.ndarray) -> np.ndarray:
    """Each block's squared error against the f32 weight, after gguf-py dequantizes it."""
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(reference.shape)
    per_block = gguf.GGML_QUANT_SIZES[tensor.tensor_type][0]
    return ((values - reference) ** 2).reshape(-1, per_block).sum(axis=1)


def skewed_imatrix(model, seed=0) -> ImportanceMatrix:
    """A made-up importance matrix with channels far apart in importance, as real activations are; one entry
    that saw no token (llama.cpp weighs its channels alike) and one tensor left out (quantized without)."""
    gen = torch.Generator().manual_seed(seed)
    matrix = ImportanceMatrix(datasets=["made-up"], chunk_count=3, chunk_size=64)
    for name, module in product_modules(model).items():
        columns = module.in_features if hasattr(module, "in_features") else module.base_layer.in_features
        matrix.sums[name] = torch.rand(columns, generator=gen) ** 4 * 50
        matrix.counts[name] = 192
    matrix.counts["blk.1.attn_q.weight"] = 0
    del matrix.sums["blk.0.ffn_up.weight"], matrix.counts["blk.0.ffn_up.weight"]
    return matrix


def compare_with_llama_cpp(tmp_path, tokenizer, quant, with_imatrix=False, **overrides):
    """Export f32 and `quant` directly; quantize the f32 file with llama.cpp (llama-quantize --imatrix when
    `with_imatrix`, both given the same made-up matrix). Returns both files and the fraction of identical
    blocks per tensor (checking types, and that any differing block is no worse than llama.cpp's)."""
    model = dora_model(tmp_path, **overrides)
    f32 = export_gguf(model, tokenizer, tmp_path / "f32.gguf", quant="f32", modelfile=False)
    matrix = skewed_imatrix(model) if with_imatrix else None
    ours = export_gguf(model, tokenizer, tmp_path / f"ours-{quant}.gguf", quant=quant, modelfile=False,
                       imatrix=matrix)
    theirs = tmp_path / f"llama-{quant}.gguf"
    if with_imatrix:
        llama_oracle.quantize_with_imatrix(f32, theirs, quant.upper(), matrix.save(tmp_path / "imatrix.gguf"))
    else:
        call_in_child(llama_oracle.quantize, f32, theirs, int(PRESETS[quant]))
    weights = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(f32).tensors}
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    same = {}
    for reference in gguf.GGUFReader(theirs).tensors:
        tensor = mine[reference.name]
        assert tensor.tensor_type == reference.tensor_type, reference.name
        identical = (blocks_of(tensor) == blocks_of(reference)).all(axis=1)
        same[reference.name] = identical.mean()
        if not identical.all() and not with_imatrix:  # a differing block must be no worse than llama.cpp's
            weight = weights[reference.name]
            ours_error, their_error = block_errors(tensor, weight), block_errors(reference, weight)
            assert (ours_error[~identical] <= their_error[~identical] * (1 + 1e-6)).all(), reference.name
    return ours, theirs, same


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("quant", list(PRESETS))
def test_k_quant_export_is_llama_cpp_quantize_byte_for_byte(tmp_path, tokenizer, quant, with_imatrix):
    ours, theirs, same = compare_with_llama_cpp(tmp_path, tokenizer, quant, with_imatrix, **WIDE)
    print(f"{quant}: identical blocks, fraction per tensor: min {min(same.values()):.4f}")
    assert min(same.values()) == 1.0
    reader = gguf.GGUFReader(ours)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["output.weight"] == T.Q6_K and types["blk.0.attn_norm.weight"] == T.F32
    if quant == "q3_k_m":  # attn_v Q5_K in the first two layers; ffn_down Q5_K in none of 8 (8 // 16 = 0)
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]
        assert types["blk.0.ffn_down.weight"] == types["blk.0.attn_output.weight"] == T.Q4_K
        assert types["blk.0.attn_q.weight"] == T.Q3_K
    elif quant != "q6_k":
        bumped = {i for i in range(8) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K}
        assert bumped == {i for i in range(8) if use_more_bits(i, 8)} == {0, 3, 6, 7}
    file_type = reader.fields["general.file_type"]
    assert file_type.parts[file_type.data[0]][0] == PRESETS[quant]
    ours_logits = call_in_child(llama_oracle.logits, ours, TOKENS, f32_cache=True)
    their_logits = call_in_child(llama_oracle.logits, theirs, TOKENS, f32_cache=True)
    assert (ours_logits.argmax(-1) == their_logits.argmax(-1)).all()


def test_rows_a_k_type_cannot_hold_fall_back_as_llama_cpp_does(tmp_path, tokenizer):
    """Rows of 64 values: Q5_0 for Q4_K and Q8_0 for Q6_K; rows of 80 (no block of 32 fits): F16. The types
    are llama.cpp's, and each fallback is announced with the tensor's name."""
    with pytest.warns(QuantFallbackWarning, match=r"blk\.0\.ffn_down\.weight: rows of 80 values"):
        ours, _, same = compare_with_llama_cpp(tmp_path, tokenizer, "q4_k_m", tie_word_embeddings=True,
                                               intermediate_size=80)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    assert types["blk.1.attn_q.weight"] == T.Q5_0 and types["token_embd.weight"] == T.Q8_0
    assert types["blk.1.attn_v.weight"] == T.Q8_0  # layer 1 of 2 gets Q6_K, whose fallback is Q8_0
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == T.F16
    print(f"fallback tensors, identical blocks: min {min(same.values()):.4f}")
    assert min(same.values()) == 1.0


def test_tied_model_writes_the_embedding_as_the_output(tmp_path, tokenizer):
    ours, _, same = compare_with_llama_cpp(tmp_path, tokenizer, "q4_k_m", tie_word_embeddings=True,
                                           **{**WIDE, "num_hidden_layers": 2})
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == T.Q6_K
    assert min(same.values()) == 1.0


def test_from_folder_with_adapter_equals_unmerged_model(tmp_path, tokenizer):
    base = base_model(tmp_path, **{**WIDE, "num_hidden_layers": 2})
    sl.save_pretrained(base, tokenizer, tmp_path / "base")
    model = with_adapters_(base)
    sl.save_adapter(model, tmp_path / "adapter")
    direct = export_gguf(model, tokenizer, tmp_path / "direct.gguf", quant="q4_k_m", modelfile=False)
    folder = export_gguf_from_folder(tmp_path / "base", tmp_path / "folder.gguf", tmp_path / "adapter",
                                     quant="q4_k_m", modelfile=False)
    assert folder.read_bytes() == direct.read_bytes()


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_dequantized_values_are_close(kind):
    """gguf-py reads our blocks back to within the type's resolution: relative RMS error by bits per value."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 512, generator=gen) * 0.02
    qtype = {"q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K}[kind]
    back = gguf.quants.dequantize(quantize_k(x, kind), qtype).reshape(x.shape)
    relative = np.sqrt(((back - x.numpy()) ** 2).mean() / (x.numpy() ** 2).mean())
    assert relative < {"q4_k": 0.12, "q5_k": 0.06, "q6_k": 0.03}[kind]


def test_bad_requests_name_what_is_allowed(tmp_path, tokenizer):
    model = dora_model(tmp_path, **{**WIDE, "num_hidden_layers": 2})
    with pytest.raises(ExportError, match=r"quant must be one of .*q4_k_m, q3_k_m, got 'q4_k_s'"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", quant="q4_k_s")
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.zeros(2, 100), "q4_k")
    narrow = base_model(tmp_path / "narrow")  # rows of 64: llama.cpp would write Q3_K's tensors as IQ4_NL
    with pytest.raises(ExportError, match=r"token_embd\.weight: rows of 64 values .* Q3_K's block of 256.*use q4_k_m"):
        export_gguf(narrow, tokenizer, tmp_path / "narrow.gguf", quant="q3_k_m")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.base_layer.weight[0, 0] = float("inf")
    with pytest.raises(ExportError, match=r"tensor blk\.1\.attn_output\.weight: non-finite"):
        export_gguf(model, tokenizer, tmp_path / "bad.gguf", quant="q4_k_m")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_type_choice_without_a_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tensor_type("blk.2.attn_norm.weight", (256,), "q4_k_m", 8, False) == T.F32
        assert tensor_type("blk.2.ffn_down.weight", (256, 512), "q4_k_m", 28, False) == T.Q6_K  # 2 < 28 // 8
        assert tensor_type("blk.4.ffn_down.weight", (256, 512), "q4_k_m", 28, False) == T.Q4_K
        assert tensor_type("blk.4.ffn_down.weight", (256, 512), "q6_k", 28, False) == T.Q6_K
        assert tensor_type("token_embd.weight", (1000, 512), "q5_k_m", 28, False) == T.Q5_K
        assert tensor_type("output.weight", (1000, 512), "q5_k_m", 28, False) == T.Q6_K
        assert tensor_type("output.weight", (1000, 320), "q4_k_m", 28, False) == T.Q8_0
