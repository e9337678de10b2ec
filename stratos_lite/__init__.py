"""stratos_lite: fine-tune Qwen3 with DoRA in plain PyTorch and ship it as GGUF.

    load_pretrained / apply_dora / ScoredDataset / TrainConfig / Trainer     train (plan() first: will it fit?)
    evaluate (TorchEngine, LlamaCppEngine)                                   score by generation, and the GGUF
    save_adapter / merge_dora / save_pretrained / export_gguf                ship: PEFT, HF folder, GGUF
    format_quant_table / smallest_within                                     which GGUF quant to ship

The `stratos-lite` command runs the same as subcommands (stratos_lite/commands).
"""

from .atomic import WriteError
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
from .engines import EngineError, LlamaCppEngine, TorchEngine
from .evaluate import ParsedScore, Prediction, evaluate, parse_completion, read_predictions
from .files import CheckpointError
from .generate import generate
from .gguf_export import ExportError, export_gguf, export_gguf_from_folder
from .guard import NonFiniteError
from .lock import LockError
from .model import KVCache, Qwen3Config, Qwen3ForCausalLM
from .plan import Plan, PlanError, plan
from .preemption import Interrupted
from .quant_choice import format_quant_table, smallest_within
from .quant_types import QuantFallbackWarning
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
    "EngineError",
    "ExportError",
    "Interrupted",
    "KVCache",
    "LlamaCppEngine",
    "LockError",
    "Message",
    "NonFiniteError",
    "ParsedScore",
    "Plan",
    "PlanError",
    "Prediction",
    "QuantFallbackWarning",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "ScoredDataset",
    "Tokenizer",
    "TorchEngine",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WriteError",
    "adapters_disabled",
    "apply_dora",
    "collate",
    "compute_dtype",
    "evaluate",
    "export_gguf",
    "export_gguf_from_folder",
    "format_quant_table",
    "generate",
    "load_adapter",
    "load_model",
    "load_pretrained",
    "merge_dora",
    "parse_completion",
    "plan",
    "read_predictions",
    "render_completion",
    "render_prompt",
    "save_adapter",
    "save_pretrained",
    "smallest_within",
    "train_chatml_tokenizer",
    "verify_sampler",
]
