"""The Ollama Modelfile written beside an exported GGUF: the ChatML template, stop tokens, greedy decoding
and the scorer's system prompt, so `ollama create` serves the prompt the model was trained on."""

from __future__ import annotations

from pathlib import Path

from ..storage.atomic import write_text

# Ollama hands the template every message in .Messages, system ones included (and joins those in .System
# as well), so the template renders .Messages alone: adding .System would send the system prompt twice.
MODELFILE_TEMPLATE = '''FROM {model}
{adapter}TEMPLATE """{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}
{{{{ .Content }}}}<|im_end|>
{{{{ end }}}}<|im_start|>assistant
"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|endoftext|>"
PARAMETER temperature 0
'''


def modelfile_text(model: str, system: str | None = None, adapter: str | None = None) -> str:
    """A Modelfile serving the GGUF at `model` (a path as Ollama reads it, from the Modelfile's folder), with a
    LoRA adapter GGUF applied over it when `adapter` names one."""
    text = MODELFILE_TEMPLATE.format(model=model, adapter=f"ADAPTER {adapter}\n" if adapter else "")
    return text + (f'SYSTEM """{system}"""\n' if system else "")


def write_modelfile(gguf_path: Path, system: str | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF (ChatML template, stop tokens, greedy), for `ollama create`."""
    return write_text(gguf_path.with_name("Modelfile"), modelfile_text(f"./{gguf_path.name}", system))
