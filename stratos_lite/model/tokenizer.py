"""Tokenizer (a `tokenizers` backend) and the one ChatML prompt builder.

Training data and inference both build their token ids through `Tokenizer.encode_chat`, so a training
example and the prompt the model later sees at inference share their prefix token for token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from ..storage.files import FileFormatError, read_json

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK, END_THINK = "<think>", "</think>"
ROLES = ("system", "user", "assistant")

# Qwen2/Qwen3's pre-tokenizer split (llama.cpp calls it "qwen2"): single digits, letters runs, punctuation.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# A ChatML template in the Jinja dialect transformers and llama.cpp read; written when a tokenizer has none.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")


def render_turn(message: Message) -> str:
    return f"{IM_START}{message.role}\n{message.content}{IM_END}\n"


def render_prompt(messages: Sequence[Message]) -> str:
    """The ChatML text up to and including the opening of the assistant's turn."""
    if any(m.role == "assistant" for m in messages):
        raise ValueError("the prompt holds system and user turns; the assistant's turn is the completion")
    return "".join(render_turn(m) for m in messages) + f"{IM_START}assistant\n"


def render_completion(answer: str, reasoning: str | None = None) -> str:
    """The assistant's turn as the model must produce it: an optional think block, the answer, <|im_end|>.

    The think block is laid out as Qwen3's chat template lays out the final assistant turn: the reasoning
    loses its surrounding newlines (and only those), so our ids equal `apply_chat_template`'s."""
    if reasoning is None:
        return f"{answer.strip()}{IM_END}"
    thoughts = reasoning.strip("\n")
    return f"{THINK}\n{thoughts}\n{END_THINK}\n\n{answer.strip()}{IM_END}"


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    prompt_length: int  # input_ids[:prompt_length] is exactly what inference feeds the model


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, backend: Backend, config: dict | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.im_start_id = self.token_id(IM_START)
        self.im_end_id = self.token_id(IM_END)
        eos = _token_content(self.config.get("eos_token")) or IM_END
        pad = _token_content(self.config.get("pad_token")) or ENDOFTEXT
        self.eos_id = self.token_id(eos)
        self.pad_id = self.token_id(pad)
        bos = _token_content(self.config.get("bos_token"))
        self.bos_id = self.token_id(bos) if bos else None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; a model folder needs tokenizer.json")
        config_path, template_path = folder / "tokenizer_config.json", folder / "chat_template.jinja"
        config = read_json(config_path) if config_path.is_file() else {}
        if "chat_template" not in config and template_path.is_file():
            config["chat_template"] = template_path.read_text()
        try:
            backend = Backend.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception for files it cannot read
            raise FileFormatError(f"{path}: not a tokenizer the tokenizers library reads: {error}") from None
        return cls(backend, config)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": self.decode([self.eos_id]),
            "pad_token": self.decode([self.pad_id]),
            "model_max_length": 131072,
            "clean_up_tokenization_spaces": False,
            **self.config,
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    @property
    def chat_template(self) -> str:
        return self.config.get("chat_template") or CHATML_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant turn: <|im_end|>, the eos token and <|endoftext|>."""
        ids = {self.im_end_id, self.eos_id}
        endoftext = self.backend.token_to_id(ENDOFTEXT)
        if endoftext is not None:
            ids.add(endoftext)
        return tuple(sorted(ids))

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no token {token!r}; a ChatML (Qwen) tokenizer is needed")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self.encode(render_prompt(messages))

    def encode_chat(self, messages: Sequence[Message], completion: str) -> EncodedChat:
        """Token ids of prompt + completion. Encoding the two parts separately equals encoding their
        concatenation, because the completion starts right after a newline that closes a pre-token."""
        prompt = self.encode_prompt(messages)
        return EncodedChat(prompt + self.encode(completion), len(prompt))


def train_chatml_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    """A small byte-level BPE tokenizer in Qwen3's shape (same pre-tokenizer, ChatML specials, think tags),
    trained on `texts`. Used by the demo and the tests, which may not download Qwen3's own."""
    backend = Backend(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_tokens([AddedToken(THINK, normalized=False, special=False),
                        AddedToken(END_THINK, normalized=False, special=False)])
    return Tokenizer(backend, {"eos_token": IM_END, "pad_token": ENDOFTEXT})
