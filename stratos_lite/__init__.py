"""stratos_lite: fine-tune Qwen3 with DoRA in plain PyTorch and ship it as GGUF."""

from .config import ConfigError, TrainConfig, compute_dtype
from .data import DEFAULT_BANDS, Band, DataError, DatasetReport, ScoredDataset, collate
from .dora import (
    AdapterSummary,
    DoRALinear,
    adapters_disabled,
    apply_dora,
    load_adapter,
    merge_dora,
    save_adapter,
)
from .files import CheckpointError
from .generate import generate
from .gguf_export import ExportError, export_gguf, export_gguf_from_folder
from .guard import NonFiniteError
from .model import KVCache, Qwen3Config, Qwen3ForCausalLM
from .plan import Plan, PlanError, plan
from .sampler import BandSampler, verify_sampler
from .tokenizer import Message, Tokenizer, render_completion, render_prompt, train_chatml_tokenizer
from .trainer import Trainer, TrainResult
from .weights import load_model, load_pretrained, save_pretrained

__all__ = [
    "DEFAULT_BANDS",
    "AdapterSummary",
    "Band",
    "BandSampler",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DatasetReport",
    "DoRALinear",
    "ExportError",
    "KVCache",
    "Message",
    "NonFiniteError",
    "Plan",
    "PlanError",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "ScoredDataset",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "adapters_disabled",
    "apply_dora",
    "collate",
    "compute_dtype",
    "export_gguf",
    "export_gguf_from_folder",
    "generate",
    "load_adapter",
    "load_model",
    "load_pretrained",
    "merge_dora",
    "plan",
    "render_completion",
    "render_prompt",
    "save_adapter",
    "save_pretrained",
    "train_chatml_tokenizer",
    "verify_sampler",
]
