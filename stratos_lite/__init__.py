"""stratos_lite: fine-tune Qwen3 with DoRA in plain PyTorch and ship it as GGUF.

    load_pretrained / apply_dora (or apply_lora) / ScoredDataset / TrainConfig / Trainer   train (plan() first)
    prepare_model                                                            the model a TrainConfig trains
    evaluate (TorchEngine, LlamaCppEngine)                                   score by generation, and the GGUF
    save_adapter / merge_adapters / save_pretrained / export_gguf (or export_lora_gguf)   ship: PEFT, HF folder, GGUF
    compute_imatrix (ImportanceMatrix)                                       the task's importance matrix for K-quants
    format_quant_table / smallest_within                                     which GGUF quant to ship

The `stratos-lite` command runs the same as subcommands (stratos_lite/commands).
"""

from .config import ConfigError, TrainConfig
from .data.batch import collate
from .data.dataset import DatasetReport, ScoredDataset
from .data.records import DataError
from .data.sampler import BandSampler, verify_sampler
from .data.task import DEFAULT_BANDS, Band, ParsedScore, parse_completion
from .evaluation.engines import EngineError, LlamaCppEngine, TorchEngine
from .evaluation.evaluate import evaluate
from .evaluation.predictions import Prediction, read_predictions
from .export.errors import ExportError
from .export.gguf_file import export_gguf, export_gguf_from_folder
from .export.imatrix import collect_imatrix, compute_imatrix
from .export.imatrix_file import ImatrixError, ImportanceMatrix
from .export.lora_gguf import export_lora_gguf
from .export.quant_choice import format_quant_table, smallest_within
from .export.quant_types import QuantFallbackWarning
from .model.dora import DoRALinear, apply_dora, merge_dora
from .model.folders import load_model, load_pretrained, save_pretrained
from .model.generate import generate
from .model.lora import AdapterSummary, LoRALinear, adapters_disabled, apply_lora, merge_adapters
from .model.nf4 import NF4Linear, quantize_base
from .model.peft_files import load_adapter, save_adapter
from .model.qwen3 import KVCache, Qwen3Config, Qwen3ForCausalLM
from .model.tokenizer import Message, Tokenizer, render_completion, render_prompt, train_chatml_tokenizer
from .planning.planner import plan
from .planning.report import Plan, PlanError
from .storage.atomic import WriteError
from .storage.files import CheckpointError, ModelFileError
from .storage.lock import LockError
from .train.builder import prepare_model
from .train.device import compute_dtype
from .train.guard import NonFiniteError
from .train.preemption import Interrupted
from .train.trainer import Trainer, TrainResult

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
    "ImatrixError",
    "ImportanceMatrix",
    "Interrupted",
    "KVCache",
    "LlamaCppEngine",
    "LoRALinear",
    "LockError",
    "Message",
    "ModelFileError",
    "NF4Linear",
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
    "apply_lora",
    "collate",
    "collect_imatrix",
    "compute_dtype",
    "compute_imatrix",
    "evaluate",
    "export_gguf",
    "export_gguf_from_folder",
    "export_lora_gguf",
    "format_quant_table",
    "generate",
    "load_adapter",
    "load_model",
    "load_pretrained",
    "merge_adapters",
    "merge_dora",
    "parse_completion",
    "plan",
    "prepare_model",
    "quantize_base",
    "read_predictions",
    "render_completion",
    "render_prompt",
    "save_adapter",
    "save_pretrained",
    "smallest_within",
    "train_chatml_tokenizer",
    "verify_sampler",
]
