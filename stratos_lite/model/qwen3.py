"""Qwen3 dense decoder in plain PyTorch.

Module and parameter names follow the Hugging Face checkpoint layout (``model.layers.0.self_attn.q_proj``
and so on), so a safetensors file maps onto this model name for name, and PEFT adapter keys are the same
names with a prefix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..storage.files import ModelFileError, read_json
from .attention import attend
from .offload import HostActivations
from .vocab_loss import token_cross_entropy


@dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> Qwen3Config:
        model_type = raw.get("model_type")
        architectures = raw.get("architectures") or ["Qwen3ForCausalLM"]
        if model_type not in (None, "qwen3") or "Qwen3ForCausalLM" not in architectures:
            raise ModelFileError(
                f"{source}: model_type={model_type!r}, architectures={architectures!r}; "
                "stratos_lite loads dense Qwen3 (Qwen3ForCausalLM) only"
            )
        quantized = raw.get("quantization_config")
        if quantized:  # GPTQ, AWQ, bitsandbytes ...: their packed integer tensors are not Qwen3's float weights
            method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else "unknown"
            raise ModelFileError(f"{source}: the folder holds a {method}-quantized model (quantization_config); "
                                 "stratos_lite reads bf16, fp16 or fp32 weights: give the unquantized folder "
                                 "(base_quant = 'nf4' quantizes it while loading)")
        # transformers >= 5 nests rope settings in `rope_parameters`; older files use rope_theta/rope_scaling.
        rope = dict(raw.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", raw.get("rope_theta", 1_000_000.0))
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("default", "yarn"):
                raise ModelFileError(f"{source}: rope scaling {kind!r} is not supported (none or yarn)")
            scaling = None if kind == "default" else {**scaling, "rope_type": "yarn"}
        try:
            heads = raw["num_attention_heads"]
            known = dict(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads", heads),
                head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            )
        except KeyError as missing:
            raise ModelFileError(f"{source}: required field {missing} is missing") from None
        optional = ("rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                    "eos_token_id")
        known.update({k: raw[k] for k in optional if raw.get(k) is not None})
        if known["num_attention_heads"] % known["num_key_value_heads"]:
            raise ModelFileError(f"{source}: attention heads must be a multiple of key/value heads")
        return cls(**known, rope_theta=float(theta), rope_scaling=scaling)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Qwen3Config:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelFileError(f"{path}: not found; a model folder needs config.json")
        return cls.from_dict(read_json(path), source=str(path))

    def to_hf_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict:
        """The config.json transformers writes for Qwen3 (both the old and the new rope keys)."""
        body = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
            **body,
            "rope_parameters": rope_parameters,
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the reference implementation does.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(config: Qwen3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for rotate-half RoPE and the attention factor that scales cos/sin (1 unless YaRN)."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float(), 1.0
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / max(high - low, 1e-3)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where the wavelength is short enough to keep the original frequency
    blended = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    return blended.float(), float(attention_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Preallocated keys and values for one layer, filled in one of two ways.

    In order: `length` positions are filled and attention sees those. Or, once `cursor` is set (a one-element
    position tensor on the device, shared by every layer): each new token is written where the cursor points
    and attention sees the whole buffer, under a mask of the filled keys. Every shape is then fixed and the
    position lives on the device, so a decoding step can be captured once in a CUDA graph and replayed."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0
        self.cursor: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor is not None:
            self.k.index_copy_(2, self.cursor, k)
            self.v.index_copy_(2, self.cursor, v)
            return self.k, self.v
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.head_dim)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.append(k, v)
        out = attend(q, k, v, mask, gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.checkpointing: str | None = None  # None, "layer" or "mlp" (see set_gradient_checkpointing)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        if self.checkpointing == "mlp" and torch.is_grad_enabled():
            return h + checkpoint(self.feed_forward, h, use_reentrant=False)
        return h + self.feed_forward(h)

    def feed_forward(self, h):
        return self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.initialize_weights()
        # Kept off the module's buffers so that model.to(bfloat16) cannot round the frequencies.
        self._inv_freq, self._attention_factor = rope_frequencies(config)
        # Makes a forward's holder of what the layers keep for backward (offload.HostActivations), or None.
        self.activation_offload: Callable[[torch.device], HostActivations] | None = None

    @torch.no_grad()
    def initialize_weights(self, std: float = 0.02) -> None:
        """Fresh weights as transformers initialises Qwen3: N(0, std) matrices, norms at one."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_gradient_checkpointing(self, enabled: bool = True, layers: list[int] | None = None,
                                   policy: str = "layer") -> None:
        """Recompute activations in backward for the given decoder layers (all when `layers` is None).

        policy "layer" keeps only each layer's input (least memory, as transformers does); "mlp" keeps the
        attention block's activations and recomputes only the MLP, which holds most of a layer's activation
        memory but little of its time, so attention (slow on CPUs) and its adapters' dropout run once."""
        if policy not in ("layer", "mlp"):
            raise ValueError(f"checkpointing policy must be 'layer' or 'mlp', got {policy!r}")
        for index, layer in enumerate(self.model.layers):
            if layers is None or index in layers:
                layer.checkpointing = policy if enabled else None

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != position_ids.device:
            self._inv_freq = self._inv_freq.to(position_ids.device)
        angles = position_ids[..., None].float() * self._inv_freq  # (b, t, head_dim / 2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (b, 1, t, head_dim), broadcast over heads
        scale = self._attention_factor
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        logits_at: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        loss_chunk: int = 0,
    ) -> torch.Tensor:
        """Logits for `input_ids` (b, t).

        attention_mask: a boolean (b, 1, t, keys) mask for SDPA, True where attention is allowed; None means
        plain causal attention over this call's tokens (training, right padding); Segments for a packed row
        of examples (with position_ids restarting at 0 for each). logits_at: flat (row-major, into b x t)
        indices of positions; when given, only those go through the vocabulary projection and the result is
        (n, vocab), which saves most of the lm_head's time and memory in training. Indices, not a boolean
        mask: selecting by a device mask makes the host wait for the device to count it. targets: with
        logits_at, the token each selected position should predict; the result is then each position's
        cross-entropy (fp32, (n,)) instead of its logits, computed over the vocabulary `loss_chunk` positions at
        a time (vocab_loss.py; 0: all at once), so a training step never holds every position's logits.
        """
        h = self.hidden_states(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                               kv_caches=kv_caches)
        if logits_at is not None:
            h = h.flatten(0, 1).index_select(0, logits_at)
        if targets is None:
            return self.lm_head(h)
        if isinstance(self.lm_head, nn.Linear):
            return token_cross_entropy(h, self.lm_head.weight, targets, loss_chunk)
        return F.cross_entropy(self.lm_head(h).float(), targets, reduction="none")  # an adapter on the head

    def hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None,
                      kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """The final normed hidden states (b, t, hidden): everything forward() does before the vocabulary."""
        b, t = input_ids.shape
        start = kv_caches[0].length if kv_caches else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        if attention_mask is None and start > 0 and t > 1:
            # New tokens after a filled cache: causal, aligned to the end of the keys (one token sees them all).
            attention_mask = torch.ones(t, start + t, dtype=torch.bool, device=input_ids.device).tril(start)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        offload = self.activation_offload(h.device) if self.activation_offload and torch.is_grad_enabled() else None
        with offload.saved() if offload else nullcontext():  # what the layers keep for backward, on the host
            for index, layer in enumerate(self.model.layers):
                cache = kv_caches[index] if kv_caches else None
                if layer.checkpointing == "layer" and torch.is_grad_enabled():
                    h = checkpoint(layer, h, cos, sin, attention_mask, cache, use_reentrant=False)
                elif cache is not None:  # decoding runs eagerly: a compiled layer would compile again as a cache fills
                    h = layer.forward(h, cos, sin, attention_mask, cache)
                else:
                    h = layer(h, cos, sin, attention_mask, cache)
        return self.model.norm(h)

    def new_kv_caches(self, batch: int, max_len: int) -> list[KVCache]:
        c, ref = self.config, self.model.embed_tokens.weight
        return [KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, ref.dtype, ref.device)
                for _ in range(c.num_hidden_layers)]


def new_model(config: Qwen3Config, dtype: torch.dtype) -> Qwen3ForCausalLM:
    """A Qwen3 with fresh weights created in `dtype`, where the current default device (or tensor mode) puts
    them: built in bf16, it has no fp32 copy to cast from."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
