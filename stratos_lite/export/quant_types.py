"""Which GGML type each tensor of a Qwen3 GGUF is written in, for each file type the export offers.

For the K-quant presets this is llama.cpp's own choice (`llama_tensor_get_type` in llama-quant.cpp, for
the tensors a dense Qwen3 has; an importance matrix changes none of these choices), so a direct `q4_k_m`
export holds the tensor types `llama-quantize ... Q4_K_M` would give it:

- the output matrix (the token embedding when the two are tied) in Q6_K, or Q8_0 when its rows are not a
  multiple of 256;
- in `q4_k_m` and `q5_k_m`, attn_v and ffn_down in Q6_K for the first and last eighth of the layers and every third
  layer between (`use_more_bits`): the tensors where quantization error costs most;
- in `q3_k_m`, attn_v in Q5_K for the first two layers and Q4_K after, ffn_down in Q5_K for the first
  sixteenth of the layers and Q4_K after, attn_output in Q4_K;
- everything else in the preset's own type; a row width the type cannot hold falls back as llama.cpp
  does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16), with a warning naming the tensor.
"""

from __future__ import annotations

import warnings

import gguf

T = gguf.GGMLQuantizationType
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K, "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
              "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M}
BASE_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q6_k": T.Q6_K, "q5_k_m": T.Q5_K,
              "q4_k_m": T.Q4_K, "q3_k_m": T.Q3_K}
MIXED = ("q4_k_m", "q5_k_m")  # the presets that give attn_v and ffn_down more bits in some layers
K_QUANTS = ("q3_k_m", "q4_k_m", "q5_k_m", "q6_k")  # the file types an importance matrix changes
FALLBACKS = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
Q3_K_M_FIRST_V = 2  # q3_k_m: the first two attn_v tensors get Q5_K, the rest Q4_K


class QuantFallbackWarning(UserWarning):
    """A tensor is written in another type than its file type's, because its rows do not fit the type's block."""


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's pick of layers whose attn_v / ffn_down get Q6_K in the _M presets."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, layers: int, tied: bool) -> T:
    """The GGML type `name` (a GGUF tensor name, shape in torch order) is written in under file type `quant`."""
    if len(shape) < 2:
        return T.F32  # norms stay f32 in every file type, as llama.cpp keeps them
    base = BASE_TYPES[quant]
    if base in (T.F32, T.F16, T.BF16):
        return base
    return _fitting(name, _preset_type(name, shape[-1], quant, layers, tied), shape[-1])


def _preset_type(name: str, columns: int, quant: str, layers: int, tied: bool) -> T:
    base = BASE_TYPES[quant]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if base == T.Q8_0 or columns % gguf.GGML_QUANT_SIZES[base][0]:
            return T.Q8_0
        return T.Q6_K
    if quant == "q3_k_m":
        return _q3_k_m_type(name, layers)
    if quant in MIXED and name.endswith((".attn_v.weight", ".ffn_down.weight")):
        layer = int(name.split(".")[1])
        if use_more_bits(layer, layers):
            return T.Q6_K
    return base


def _q3_k_m_type(name: str, layers: int) -> T:
    """Q3_K_M's mix for a dense model: attn_v Q5_K in the first two layers and Q4_K after, ffn_down Q5_K in the
    first sixteenth of the layers and Q4_K after, attn_output Q4_K, the rest Q3_K."""
    if name.endswith(".attn_v.weight"):
        return T.Q5_K if int(name.split(".")[1]) < Q3_K_M_FIRST_V else T.Q4_K
    if name.endswith(".ffn_down.weight"):
        return T.Q5_K if int(name.split(".")[1]) < layers // 16 else T.Q4_K
    if name.endswith(".attn_output.weight"):
        return T.Q4_K
    return T.Q3_K


def _fitting(name: str, qtype: T, columns: int) -> T:
    """qtype, or llama.cpp's fallback for rows it cannot hold, with a warning saying so."""
    chosen = qtype
    if columns % gguf.GGML_QUANT_SIZES[chosen][0] and chosen == T.Q3_K:
        raise ValueError(f"{name}: rows of {columns} values are not a multiple of Q3_K's block of 256; llama.cpp "
                         "writes such tensors in IQ4_NL, which this exporter does not: use q4_k_m")
    if columns % gguf.GGML_QUANT_SIZES[chosen][0]:
        chosen = FALLBACKS.get(chosen, T.F16)
        if columns % gguf.GGML_QUANT_SIZES[chosen][0]:
            chosen = T.F16
        warnings.warn(f"{name}: rows of {columns} values are not a multiple of {qtype.name}'s block of "
                      f"{gguf.GGML_QUANT_SIZES[qtype][0]}; written as {chosen.name}", QuantFallbackWarning,
                      stacklevel=4)
    return chosen
