"""stratos_lite: fine-tune Qwen3 with DoRA in plain PyTorch and ship it as GGUF."""

from .generate import generate
from .model import CheckpointError, KVCache, Qwen3Config, Qwen3ForCausalLM
from .tokenizer import Message, Tokenizer, render_completion, render_prompt, train_chatml_tokenizer
from .weights import load_model, load_pretrained, save_pretrained

__all__ = [
    "CheckpointError",
    "KVCache",
    "Message",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Tokenizer",
    "generate",
    "load_model",
    "load_pretrained",
    "render_completion",
    "render_prompt",
    "save_pretrained",
    "train_chatml_tokenizer",
]
