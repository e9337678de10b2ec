"""Write a Qwen3 model straight to GGUF (f32, f16, bf16, q8_0, q6_k, q5_k_m or q4_k_m) for llama.cpp and
Ollama, in one pass.

Tensor by tensor: each weight is taken from the model (LoRA or DoRA layers merged on the fly), quantized, written
and dropped before the next is made, so memory stays near the model plus one tensor. The `gguf` package
provides the container and its constants; q8_0 is computed here in torch, byte-identical to
`gguf.quants.quantize`, and the K-quants in kquants.py, byte-identical to llama.cpp's quantizer, with the
per-tensor types of quant_types.py. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..model.folders import folder_dtype, load_pretrained_with_adapter
from ..model.lora import QUANTIZED_BASE_MERGE, LoRALinear, has_quantized_base, rows_per_block
from ..model.qwen3 import Qwen3ForCausalLM
from ..model.tokenizer import Tokenizer
from ..storage.atomic import staged_file
from .errors import ExportError
from .imatrix_file import ImportanceMatrix
from .kquants import BLOCK_BYTES, SUPER_BLOCK, quantize_k
from .modelfile import write_modelfile
from .quant_types import FILE_TYPES, tensor_type

QUANTS = tuple(FILE_TYPES)  # the `quant` names export_gguf takes
K_TYPES = {gguf.GGMLQuantizationType.Q3_K: "q3_k", gguf.GGMLQuantizationType.Q4_K: "q4_k",
           gguf.GGMLQuantizationType.Q5_K: "q5_k", gguf.GGMLQuantizationType.Q6_K: "q6_k"}
Q8_BLOCK = 32
# torch module path inside a decoder layer -> GGUF tensor name (llama.cpp's qwen3 names).
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


# q8_0 -----------------------------------------------------------------------------------------------------

class RowBlocks:
    """A 2-D weight handed out a block of rows at a time: a plain tensor's rows, or an adapter layer's merged
    rows, computed only when the writer reaches them."""

    def __init__(self, shape: tuple[int, ...], rows: Callable[[int, int], torch.Tensor], block_rows: int = 0):
        self.shape, self.rows = shape, rows
        # Adapter merges use the same blocks (lora.rows_per_block), so streamed and merged values agree bit for bit.
        self.block_rows = block_rows or (rows_per_block(shape[-1]) if len(shape) == 2 else shape[0])

    @classmethod
    def of_tensor(cls, tensor: torch.Tensor, block_rows: int = 0) -> RowBlocks:
        return cls(tuple(tensor.shape), lambda start, end: tensor[start:end], block_rows)

    @classmethod
    def of(cls, module: nn.Module) -> RowBlocks:
        if isinstance(module, LoRALinear):
            return cls(tuple(module.base_layer.weight.shape), module.merged_rows)
        return cls.of_tensor(module.weight.detach())

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) a block at a time, on the CPU: a model on a GPU is exported block by block,
        never whole in host memory."""
        for start in range(0, self.shape[0], self.block_rows):
            yield start, self.rows(start, start + self.block_rows).cpu()

    def whole(self) -> torch.Tensor:
        return torch.cat([block for _, block in self.blocks()])


def quantize_q8_0(weight: torch.Tensor | RowBlocks) -> np.ndarray:
    """Q8_0 blocks of a 2-D weight as bytes (rows, cols / 32 * 34): per block of 32 values, fp16
    d = max|x| / 127 and q = round-half-away-from-zero(x * (1/d)) as int8, in the same fp32 arithmetic as
    gguf-py (floor(|v|) + floor(2 frac|v|), signed), so the bytes are identical.

    Works through blocks of rows of about 2 MB in fp32, which stay in cache here (much smaller blocks pay
    per-op overhead, much larger ones spill out of it and run slower), in place where possible. A NaN or Inf
    raises ExportError (it shows in the block maxima, 1/32 of the data to check)."""
    source = weight if isinstance(weight, RowBlocks) else RowBlocks.of_tensor(weight)
    rows, cols = source.shape
    if cols % Q8_BLOCK:
        raise ExportError(f"q8_0 needs rows of a multiple of {Q8_BLOCK} values, got {cols}")
    out = np.empty((rows, cols // Q8_BLOCK * 34), dtype=np.uint8)
    out_view = torch.from_numpy(out)
    for start, block in source.blocks():
        x = block.float().reshape(-1, Q8_BLOCK)
        d = x.abs().amax(dim=1, keepdim=True) / 127
        if not torch.isfinite(d).all():
            raise ExportError("non-finite value (NaN or Inf)")
        scaled = (x * torch.where(d == 0, 0.0, 1.0 / d)).abs_()  # the fp32 inverse, not the fp16-rounded d
        whole = scaled.floor()
        q = scaled.sub_(whole).mul_(2).floor_().add_(whole).copysign_(x).to(torch.int8)
        target = out_view[start:start + len(block)].view(-1, 34)  # rows are contiguous: a view into `out`
        target[:, :2] = d.to(torch.float16).view(torch.uint8)
        target[:, 2:] = q.view(torch.uint8)
    return out


# the tensor plan ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    name: str
    source: RowBlocks  # the (merged) weight, produced block by block when its turn to be written comes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape


def tensor_plan(model: Qwen3ForCausalLM) -> list[PlannedTensor]:
    config, body = model.config, model.model
    plan = [PlannedTensor("token_embd.weight", RowBlocks.of(body.embed_tokens))]
    for index, layer in enumerate(body.layers):
        for path, gguf_name in LAYER_TENSORS.items():
            plan.append(PlannedTensor(f"blk.{index}.{gguf_name}.weight", RowBlocks.of(layer.get_submodule(path))))
    plan.append(PlannedTensor("output_norm.weight", RowBlocks.of(body.norm)))
    if not config.tie_word_embeddings:
        plan.append(PlannedTensor("output.weight", RowBlocks.of(model.lm_head)))
    expected = 2 + len(LAYER_TENSORS) * config.num_hidden_layers + (0 if config.tie_word_embeddings else 1)
    if len(plan) != expected:  # llama.cpp refuses a file whose tensor count differs ("wrong number of tensors")
        raise ExportError(f"planned {len(plan)} tensors, llama.cpp expects {expected} for this config")
    return plan


def quantize_k_blocks(source: RowBlocks, kind: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """A K-quant of a weight handed out in row blocks, written into one array block by block, weighted by an
    importance per column when one is given."""
    rows, cols = source.shape
    out = np.empty((rows, cols // SUPER_BLOCK * BLOCK_BYTES[kind]), dtype=np.uint8)
    for start, block in source.blocks():
        x = block.float()
        if not torch.isfinite(x).all():
            raise ExportError("non-finite value (NaN or Inf)")
        out[start:start + len(block)] = quantize_k(x, kind, importance)
    return out


def encode(planned: PlannedTensor, qtype: gguf.GGMLQuantizationType,
           imatrix: ImportanceMatrix | None = None) -> np.ndarray:
    """The bytes to write for one tensor, in the type announced for it in the header. An importance matrix
    weighs the K-quants' rounding, as llama-quantize --imatrix does (q8_0 and the float types ignore it, as
    llama.cpp's do)."""
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return quantize_q8_0(planned.source)
    if qtype in K_TYPES:
        importance = imatrix.importance(planned.name) if imatrix else None
        return quantize_k_blocks(planned.source, K_TYPES[qtype], importance)
    tensor = planned.source.whole()
    if not torch.isfinite(tensor).all():
        raise ExportError("non-finite value (NaN or Inf)")
    if qtype == gguf.GGMLQuantizationType.F32:
        return tensor.float().contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    return gguf.quants.quantize(tensor.float().numpy(), qtype)  # Q5_0 / Q5_1: K-quant fallbacks for odd rows


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def planned_types(model: Qwen3ForCausalLM, plan: list[PlannedTensor], quant: str) -> list[gguf.GGMLQuantizationType]:
    """Each planned tensor's GGML type under file type `quant` (quant_types.tensor_type); a tensor the file type
    cannot hold at all raises ExportError."""
    config = model.config
    try:
        return [tensor_type(t.name, t.shape, quant, config.num_hidden_layers, config.tie_word_embeddings)
                for t in plan]
    except ValueError as error:
        raise ExportError(str(error)) from None


# metadata -------------------------------------------------------------------------------------------------

def add_hyperparameters(writer: gguf.GGUFWriter, model: Qwen3ForCausalLM, quant: str, name: str) -> None:
    c = model.config
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)  # without these llama.cpp assumes hidden / heads, wrong for Qwen3
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if c.rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(c.rope_scaling["factor"])
        original = c.rope_scaling.get("original_max_position_embeddings") or c.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def vocabulary(tokenizer: Tokenizer, rows: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings for ids 0..rows-1 (padded with [PAD{i}]), their GGUF token types, and the merges."""
    spec = json.loads(tokenizer.backend.to_str())
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    if tokenizer.vocab_size > rows:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {rows} rows")
    tokens, types = [], []
    for index in range(rows):
        token = tokenizer.backend.id_to_token(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            control = added[index].get("special") or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, rows: int) -> None:
    tokens, types, merges = vocabulary(tokenizer, rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(False)  # ChatML prompts start with <|im_start|>; Ollama would otherwise add one
    writer.add_chat_template(tokenizer.chat_template)


def add_imatrix_provenance(writer: gguf.GGUFWriter, imatrix: ImportanceMatrix) -> None:
    """The keys llama-quantize adds when it quantizes with a matrix: its file, first dataset, entries, chunks."""
    writer.add_string("quantize.imatrix.file", imatrix.file or "<computed while exporting>")
    if imatrix.datasets:
        writer.add_string("quantize.imatrix.dataset", imatrix.datasets[0])
    writer.add_int32("quantize.imatrix.entries_count", len(imatrix.sums))
    if imatrix.chunk_count:
        writer.add_int32("quantize.imatrix.chunks_count", imatrix.chunk_count)


# the export -----------------------------------------------------------------------------------------------

def _stream(plan: list[PlannedTensor], qtypes: list[gguf.GGMLQuantizationType],
            imatrix: ImportanceMatrix | None) -> Iterator[np.ndarray]:
    for planned, qtype in zip(plan, qtypes, strict=True):
        try:
            yield encode(planned, qtype, imatrix)
        except ExportError as error:
            raise ExportError(f"tensor {planned.name}: {error}; nothing was written") from None


@torch.no_grad()
def export_gguf(model: Qwen3ForCausalLM, tokenizer: Tokenizer, path: str | Path, quant: str = "q8_0",
                name: str = "stratos-qwen3", system_prompt: str | None = None, modelfile: bool = True,
                imatrix: ImportanceMatrix | None = None) -> Path:
    """Write `model` (adapter layers merged tensor by tensor) and its tokenizer to a GGUF file at `path`.
    imatrix: an importance matrix (imatrix.py) the K-quants weigh their rounding by, as llama-quantize
    --imatrix does; without one the file is what llama-quantize writes without."""
    if quant not in QUANTS:
        raise ExportError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if not isinstance(model, Qwen3ForCausalLM):
        raise ExportError(f"only Qwen3ForCausalLM exports (architecture qwen3), got {type(model).__name__}")
    if has_quantized_base(model):
        raise ExportError(QUANTIZED_BASE_MERGE)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(model)
    if imatrix is not None:
        for planned in plan:
            imatrix.check_fits(planned.name, planned.shape[-1])
    with staged_file(target) as staging:  # the GGUF appears under its name whole, or not at all
        _write_gguf(gguf.GGUFWriter(staging, "qwen3"), model, tokenizer, plan, quant, name, imatrix)
    if modelfile:
        write_modelfile(target, system_prompt)
    return target


def _write_gguf(writer: gguf.GGUFWriter, model: Qwen3ForCausalLM, tokenizer: Tokenizer, plan: list[PlannedTensor],
                quant: str, name: str, imatrix: ImportanceMatrix | None) -> None:
    try:
        add_hyperparameters(writer, model, quant, name)
        add_tokenizer(writer, tokenizer, model.config.vocab_size)
        if imatrix is not None:
            add_imatrix_provenance(writer, imatrix)
        qtypes = planned_types(model, plan, quant)
        for planned, qtype in zip(plan, qtypes, strict=True):
            writer.add_tensor_info(planned.name, planned.shape, np.dtype(np.float32), _nbytes(planned.shape, qtype),
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _stream(plan, qtypes, imatrix):
            writer.write_tensor_data(data)
    finally:
        writer.close()


def export_gguf_from_folder(model_dir: str | Path, path: str | Path, adapter: str | Path | None = None,
                            quant: str = "q8_0", **options) -> Path:
    """The same from an HF folder (and an optional LoRA or DoRA adapter, merged tensor by tensor while writing).
    The weights are memory-mapped in their stored dtype, so nothing is converted ahead of time."""
    model, tokenizer = load_pretrained_with_adapter(model_dir, adapter, dtype=folder_dtype(model_dir))
    return export_gguf(model, tokenizer, path, quant, **options)
