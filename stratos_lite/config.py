"""What a run asks for: TrainConfig, its validation, and which settings a resumed run may change.

Every setting is checked for type and range when the config is made (from TOML, `--set` or Python), so a bad
value is refused before anything is loaded, with one line naming the setting, the value and what is allowed.
The loop (trainer.py), the plan (plan.py), the strategies (strategy.py) and a run from a file (run.py) read
this module; it reads none of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .model.lora import DEFAULT_TARGETS
from .storage.files import read_toml

ADAPTER_NAMES = {"dora": "DoRA", "lora": "LoRA"}  # each adapter mode, as reports name it


@dataclass
class TrainConfig:
    # What to train on (read by tools/train.py; a script that builds its own model and data may leave them).
    model: str = ""
    train_data: str = ""
    eval_data: str = ""
    out_dir: str = "runs/train"
    # Adapter: "dora" or "lora" wraps the targets (DoRA: LoRA plus a trained magnitude per row); "full" trains
    # every parameter.
    mode: str = "dora"
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False  # scale the update by alpha / sqrt(rank) (rsLoRA; PEFT's use_rslora) instead of alpha / rank
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # The frozen base under the adapter: "none" keeps it in the compute dtype; "nf4" holds each target linear's
    # weight in 4 bits (QLoRA's NormalFloat, model/nf4.py), quantized while loading and dequantized a layer at a
    # time as it computes. Embeddings, norms and the output projection stay in the compute dtype.
    base_quant: str = "none"
    # Data.
    max_len: int = 1024
    band_sampling: bool = True
    contrastive_boost: float = 1.0  # > 1 draws contrastive-group examples more often within their band
    loss_denominator: str = "examples"  # or "weights"
    # Packing (packing.py): a step's batch_size x grad_accum examples laid out whole in rows of at most
    # pack_tokens tokens (unset: batch_size x max_len), one forward and backward a row, attention and
    # positions per example: the same gradient without the padding.
    packing: bool = False
    pack_tokens: int | None = None
    verify_batches: int = 1000
    # Optimisation.
    batch_size: int = 2
    grad_accum: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.05
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    max_grad_norm: float = 1.0
    dtype: str = "bfloat16"  # or "float32", or "auto": bf16 where the device computes it natively
    gradient_checkpointing: bool = True
    checkpoint_policy: str = "layer"  # or "mlp": recompute only each layer's MLP (faster, more memory)
    # The loss over the vocabulary, this many completion positions at a time (model/vocab_loss.py): one chunk of
    # logits and of their gradient exists at once, not a micro-batch's. 0: all at once.
    loss_chunk: int = 256
    # What the decoder layers keep for backward (under "layer" checkpointing: each layer's input) in pinned host
    # memory between the forward and the backward, copied out and back beside the compute on a GPU
    # (model/offload.py): the device holds about two layers' worth. The same losses, bit for bit.
    offload_activations: bool = False
    # "sdpa": PyTorch picks the attention kernel (flash where it can). "math": matmul, softmax, matmul, which
    # keeps each layer's (heads x length x length) probabilities for the backward (the plan counts them); on a
    # CPU it can beat the flash kernel at short sequences and loses to it at long ones. Measure before choosing.
    attention_kernel: str = "sdpa"
    # torch.compile each decoder layer (model/compiling.py): the first steps pay the compilation, the rest may
    # run faster or slower depending on the device: measure it there. Runs with the strategy "ddp" (one process
    # or several) and heap_release "off" or "steps".
    compile: bool = False
    seed: int = 0
    # Bitwise reruns: a CPU run is deterministic as it is. On a GPU, true turns on PyTorch's deterministic
    # algorithms for the run (and CUBLAS_WORKSPACE_CONFIG) and sums each example's token losses without atomic
    # adds; it costs speed there.
    deterministic: bool = False
    # Several ranks (torchrun): "ddp" keeps a whole replica per rank; "fsdp" shards parameters, gradients and
    # optimizer state across ranks (FSDP2), optionally keeping parameters in CPU memory between uses.
    strategy: str = "ddp"
    cpu_offload: bool = False
    # CPU memory (stratos_lite/heap.py): hand freed heap pages back to the OS so that peak RSS follows the
    # tensors alive (the plan's figure) instead of drifting above it. "steps": at each micro-batch's forward
    # and backward and after the optimizer step; "layers": also every `heap_release_every` decoder layers.
    # Each release costs faulting the pages in again: worth it where steps are long, costly where they are short.
    heap_release: str = "off"
    heap_release_every: int = 4
    # Checkpoints, logging, the guard.
    save_every: int = 200
    keep_checkpoints: int = 3
    eval_every: int = 0  # held-out loss every N steps (0: never)
    eval_examples: int = 256
    max_nonfinite_steps: int = 0  # skip up to N non-finite steps instead of stopping
    progress: bool = True  # report as the run goes: the data's report and the adapter at start, a bar per step
    # Where step records go: metrics.jsonl always (the record resuming and the summary read), and TensorBoard
    # event files under out_dir/tensorboard with "tensorboard" (pip install 'stratos_lite[tensorboard]').
    log: list[str] = field(default_factory=lambda: ["jsonl"])
    # Resuming a checkpoint under settings that change what the run computes (RECIPE below) stops with the
    # list of changes; true continues anyway, printing them and recording them in metrics.jsonl.
    allow_recipe_change: bool = False

    def __post_init__(self):
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            problem = _setting_problem(spec.name, spec.type, value)
            if problem:
                raise ConfigError(spec.name, problem)
            if spec.type == "float":  # an integer written for a float setting (lr = 1) is that float
                setattr(self, spec.name, float(value))
        self._check_base_quant()
        if self.compile and self.strategy == "fsdp":
            raise ConfigError("compile", "setting 'compile' = true runs with strategy 'ddp' (one process or "
                                         "several), not 'fsdp'")
        if self.compile and self.heap_release == "layers":
            raise ConfigError("compile", "setting 'compile' = true needs heap_release 'off' or 'steps': 'layers' "
                                         "hooks into every layer, which a compiled layer cannot call out to")

    def _check_base_quant(self) -> None:
        if self.base_quant == "none":
            return
        if self.mode == "full":
            raise ConfigError("base_quant", f"setting 'base_quant' = {self.base_quant!r} quantizes the frozen base "
                                            "under an adapter; mode 'full' trains every weight: use mode 'dora'")
        if self.strategy == "fsdp":
            raise ConfigError("base_quant", f"setting 'base_quant' = {self.base_quant!r} runs with strategy 'ddp': "
                                            "FSDP shards parameters, and a 4-bit base is held in buffers of codes it "
                                            "does not shard (4-bit 8B fits one 12 GB card whole)")

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
        return cls.from_dict(read_toml(path), source=str(path), overrides=overrides)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config", overrides: list[str] = ()) -> TrainConfig:
        """Settings from a file's values, then `--set key=value` overrides; errors name where a bad value
        came from (the file, or --set)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values, origin = dict(values), dict.fromkeys(values, source)
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError("", f"--set expects key=value, got {item!r}")
            values[key.strip()] = _parse_value(raw.strip())
            origin[key.strip()] = "--set"
        unknown = sorted(values.keys() - known)
        if unknown:
            raise ConfigError(unknown[0], f"{origin[unknown[0]]}: unknown setting {unknown[0]!r}; "
                                          f"known settings: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(error.setting, f"{origin.get(error.setting, source)}: {error}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def row_tokens(self) -> int:
        """The most tokens a packed row holds: pack_tokens, or batch_size x max_len when it is unset."""
        return self.pack_tokens or self.batch_size * self.max_len

    def check_packing(self, lengths) -> None:
        """With packing on, every example must fit a row; `lengths` are the examples' token counts (None when
        the dataset cannot say)."""
        if not self.packing:
            return
        if lengths is None:
            raise ConfigError("packing", "packing = true needs each example's token count: give the dataset a "
                                         "`lengths` attribute (a sequence of ints), as ScoredDataset has")
        longest = max(lengths)
        if longest > self.row_tokens:
            raise ConfigError("pack_tokens", f"setting 'pack_tokens' = {self.row_tokens}"
                              f"{'' if self.pack_tokens else ' (batch_size x max_len)'}: the longest example has "
                              f"{longest} tokens and must fit one row; set pack_tokens >= {longest}")


class ConfigError(ValueError):
    """A setting with a wrong type or value; `setting` names it, the message says what is allowed."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, float) or _is_int(value)) and not math.isnan(value)


# Each annotation's test and its wording; then the allowed values of each setting beyond its type.
_TYPES = {
    "int": (_is_int, "an integer"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer"),
    "float": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
                  "a list of non-empty strings"),
    "list[float]": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
}


def _one_of(*allowed):
    return lambda v: v in allowed, "one of " + ", ".join(repr(a) for a in allowed)


def _at_least(low):
    return lambda v: v >= low, f">= {low}"


_POSITIVE = (lambda v: v > 0, "> 0")
_POSITIVE_FINITE = (lambda v: 0 < v < math.inf, "> 0 and finite")
_RANGES = {
    "out_dir": (bool, "not empty"),
    "mode": _one_of("dora", "lora", "full"),
    "rank": _at_least(1),
    "alpha": _POSITIVE_FINITE,
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "targets": (bool, "not empty"),
    "base_quant": _one_of("none", "nf4"),
    "max_len": _at_least(8),
    "pack_tokens": (lambda v: v is None or v >= 1, ">= 1 and at least the longest example (unset: batch_size x "
                    "max_len)"),
    "contrastive_boost": _POSITIVE_FINITE,
    "loss_denominator": _one_of("examples", "weights"),
    "verify_batches": _at_least(0),
    "batch_size": _at_least(1),
    "grad_accum": _at_least(1),
    "lr": _POSITIVE_FINITE,
    "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "adam_betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    "adam_eps": _POSITIVE_FINITE,
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "epochs": _POSITIVE_FINITE,
    "max_steps": _at_least(0),
    "max_grad_norm": _POSITIVE,  # inf: report the norm, never clip
    "dtype": _one_of("bfloat16", "float32", "auto"),
    "checkpoint_policy": _one_of("layer", "mlp"),
    "loss_chunk": _at_least(0),
    "attention_kernel": _one_of("sdpa", "math"),
    "strategy": _one_of("ddp", "fsdp"),
    "heap_release": _one_of("off", "steps", "layers"),
    "heap_release_every": _at_least(1),
    "seed": (lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    "save_every": _at_least(1),
    "keep_checkpoints": _at_least(0),  # 0 keeps every checkpoint
    "eval_every": _at_least(0),
    "eval_examples": _at_least(1),
    "max_nonfinite_steps": _at_least(0),
    "log": (lambda v: "jsonl" in v and set(v) <= {"jsonl", "tensorboard"},
            'a list holding "jsonl" (always written), and "tensorboard" if wanted'),
}


def _setting_problem(name: str, annotation: str, value) -> str | None:
    """What is wrong with one setting's value (its name, the value and what is allowed), or None."""
    is_type, kind = _TYPES[annotation]
    in_range, allowed = _RANGES.get(name, (lambda v: True, ""))
    if is_type(value) and in_range(value):
        return None
    return f"setting {name!r} = {value!r}: expected {kind}{', ' + allowed if allowed else ''}"


def _parse_value(raw: str):
    """A --set value as TOML reads it (numbers, booleans, lists, quoted strings), else the bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# Settings that do not change what a run computes, only how it is watched, stored or scheduled on the
# hardware: they may differ between a checkpoint and the run that resumes it. Every other setting is part of
# the recipe (a new setting is, until it is listed here).
NOT_RECIPE = frozenset({
    "out_dir", "eval_data", "progress", "save_every", "keep_checkpoints", "heap_release", "heap_release_every",
    "eval_every", "eval_examples", "verify_batches", "max_nonfinite_steps", "gradient_checkpointing",
    "checkpoint_policy", "loss_chunk", "offload_activations", "attention_kernel", "compile", "strategy", "cpu_offload",
    "allow_recipe_change", "log", "deterministic",
})


def recipe_changes(saved: dict, config: TrainConfig, saved_ranks: int, ranks: int) -> list[str]:
    """Each recipe setting that differs between a checkpoint's config (`saved`, written by `saved_ranks`
    ranks) and `config` on `ranks` ranks, as `name: checkpoint value -> new value`. The batch is compared as
    batch_size x ranks, the examples every micro-batch draws across ranks, so a run started on 2 ranks at
    batch 2 resumes on 1 at batch 4."""
    changes = []
    for name, value in config.to_dict().items():
        if name in NOT_RECIPE or name not in saved:  # absent: written before the setting existed
            continue
        before = saved[name]
        if name == "batch_size":
            before, value, name = before * saved_ranks, value * ranks, "batch_size x ranks"
        if before != value:
            changes.append(f"{name}: {before!r} -> {value!r}")
    return changes


def settings_help() -> str:
    """Every TrainConfig setting with its default and what it allows, from the validation tables above (the
    `--help` of the training commands)."""
    lines = ["settings (in the TOML file, or --set key=value), as `name = default: what is allowed`; those marked *",
             "may change when a run resumes, the others are its recipe:"]
    for spec in dataclasses.fields(TrainConfig):
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        kind = _TYPES[spec.type][1]
        allowed = _RANGES.get(spec.name, (None, ""))[1]
        free = " *" if spec.name in NOT_RECIPE else ""
        lines.append(f"  {spec.name} = {json.dumps(default)}: {kind}{', ' + allowed if allowed else ''}{free}")
    return "\n".join(lines)
