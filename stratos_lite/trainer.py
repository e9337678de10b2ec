"""TrainConfig and Trainer: one visible loop over optimizer steps.

Each step draws its `grad_accum` micro-batches up front and fixes ONE loss denominator for the whole step
(the number of examples, or the sum of their weights, over all ranks), then backpropagates micro-batch by
micro-batch. So k micro-batches of b give the gradient of one batch of k x b, whatever their lengths.

    per-example loss = mean token cross-entropy over its completion
    step loss        = sum(weight x per-example loss) / denominator
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import tomllib
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .checkpoint import CheckpointWarning, checkpoint_damage, checkpoints, load_checkpoint, save_checkpoint
from .data import IGNORE_INDEX, collate
from .distributed import (
    init_distributed,
    is_sharded,
    local,
    shard_model,
    whole,
    whole_parameters,
    whole_state,
    whole_trainable,
)
from .dora import DEFAULT_TARGETS, dora_layers, save_adapter
from .files import read_toml
from .heap import release_free_memory, released_every
from .model import CheckpointError, Qwen3ForCausalLM
from .sampler import BandSampler, format_verification, verify_sampler
from .training_report import write_training_summary
from .weights import save_pretrained

# Environment flags known to produce NaN gradients (the report lost 7 hours to the first one).
RISKY_ENV_FLAGS = {
    "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "experimental AOTriton attention kernels on ROCm: their backward "
    "gave NaN gradients with DoRA + gradient checkpointing + bf16 on Navi31 (ROCm 6.2)",
}


@dataclass
class TrainConfig:
    # What to train on (read by tools/train.py; a script that builds its own model and data may leave them).
    model: str = ""
    train_data: str = ""
    eval_data: str = ""
    out_dir: str = "runs/train"
    # Adapter: "dora" wraps the targets; "full" trains every parameter.
    mode: str = "dora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # Data.
    max_len: int = 1024
    band_sampling: bool = True
    contrastive_boost: float = 1.0  # > 1 draws contrastive-group examples more often within their band
    loss_denominator: str = "examples"  # or "weights"
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
    # "sdpa": PyTorch picks the attention kernel (flash where it can). "math": matmul, softmax, matmul, which
    # keeps each layer's (heads x length x length) probabilities for the backward (the plan counts them) but
    # was the faster one on a 2-core AVX-512 CPU in bf16 below ~190 tokens: 0.7-0.8x the time at 160, 1.0-1.3x
    # at 192, 3.6x at 1024 (benchmarks/attention_speed.py, two runs). Measure before choosing it.
    attention_kernel: str = "sdpa"
    seed: int = 0
    # Several ranks (torchrun): "ddp" keeps a whole replica per rank; "fsdp" shards parameters, gradients and
    # optimizer state across ranks (FSDP2), optionally keeping parameters in CPU memory between uses.
    strategy: str = "ddp"
    cpu_offload: bool = False
    # CPU memory (stratos_lite/heap.py): hand freed heap pages back to the OS so that peak RSS follows the
    # tensors alive (the plan's figure) instead of drifting above it. "steps": at each micro-batch's forward
    # and backward and after the optimizer step; "layers": also every `heap_release_every` decoder layers.
    # Pays where steps are long (Qwen3-0.6B: "layers" up to 25 % slower); short steps pay 1.4x.
    heap_release: str = "off"
    heap_release_every: int = 4
    # Checkpoints, logging, the guard.
    save_every: int = 200
    keep_checkpoints: int = 3
    eval_every: int = 0  # held-out loss every N steps (0: never)
    eval_examples: int = 256
    max_nonfinite_steps: int = 0  # skip up to N non-finite steps instead of stopping
    progress: bool = True

    def __post_init__(self):
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            problem = _setting_problem(spec.name, spec.type, value)
            if problem:
                raise ConfigError(spec.name, problem)
            if spec.type == "float":  # an integer written for a float setting (lr = 1) is that float
                setattr(self, spec.name, float(value))

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
    "mode": _one_of("dora", "full"),
    "rank": _at_least(1),
    "alpha": _POSITIVE_FINITE,
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "targets": (bool, "not empty"),
    "max_len": _at_least(8),
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


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware: GPUs that support bf16, and CPUs with AVX512-BF16
    or AMX (what oneDNN checks). On other CPUs bf16 is emulated: a demo step measured 25x slower than fp32 on
    an AVX2-only AMD EPYC (benchmarks/dtype_speed.py)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype TrainConfig.dtype asks for on `device` ("auto": bf16 where native, else fp32)."""
    if setting == "auto":
        return torch.bfloat16 if bf16_is_native(device) else torch.float32
    return getattr(torch, setting)


def attention_kernel(setting: str):
    """The context a training forward and backward run under for TrainConfig.attention_kernel. The backward
    runs under it too: gradient checkpointing recomputes forwards there."""
    return sdpa_kernel(SDPBackend.MATH) if setting == "math" else nullcontext()


def optimizer_steps(config: TrainConfig, examples: int, world_size: int = 1) -> int:
    """How many optimizer steps a run of `config` over `examples` takes: max_steps when set, else its epochs
    at batch_size x grad_accum x world_size examples per step."""
    if config.max_steps > 0:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum * world_size
    return max(1, math.ceil(config.epochs * examples / per_step))


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup from 0 over `warmup` steps, then half a cosine down to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def example_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token cross-entropy over each example's completion, shape (b,).

    Only completion positions go through the vocabulary projection (most of a prompt never needs logits)."""
    targets = batch["labels"][:, 1:]
    select = torch.zeros_like(batch["labels"], dtype=torch.bool)
    select[:, :-1] = targets != IGNORE_INDEX
    logits = model(batch["input_ids"], logits_mask=select)
    token_losses = F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="none")
    rows = select.nonzero()[:, 0]
    counts = select.sum(dim=1)
    sums = torch.zeros(len(counts), device=token_losses.device).index_add(0, rows, token_losses)
    return sums / counts.clamp_min(1)


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient norm; the message holds the diagnosis."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    average_loss: float
    seconds: float
    out_dir: Path


class Trainer:
    def __init__(self, model: nn.Module, train_dataset, config: TrainConfig, eval_dataset=None, pad_id: int = 0):
        self.model, self.train_dataset, self.config = model, train_dataset, config
        self.eval_dataset, self.pad_id = eval_dataset, pad_id
        self.out_dir = Path(config.out_dir)
        self.rank, self.world_size = init_distributed()
        self.device = next(model.parameters()).device
        self.compute_dtype = compute_dtype(config.dtype, self.device)  # resolved once, not per micro-batch
        self.release_heap = self.device.type == "cpu" and config.heap_release != "off"
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires grad (apply_dora, or mode='full')")

    # -- setup ----------------------------------------------------------------------------------------------

    def total_steps(self) -> int:
        return optimizer_steps(self.config, len(self.train_dataset), self.world_size)

    def _sampler(self) -> BandSampler:
        dataset, config = self.train_dataset, self.config
        bands = getattr(dataset, "band_ids", None)
        if config.band_sampling and bands is not None:
            shares = [b.target_share for b in dataset.bands]
        else:  # uniform sampling: one band holding every example
            bands, shares = [0] * len(dataset), [1.0]
        boost = dataset.contrastive_boost(config.contrastive_boost) if config.contrastive_boost != 1.0 else None
        return BandSampler(bands, shares, seed=config.seed, boost=boost, rank=self.rank, world_size=self.world_size)

    def _verify_sampler(self, sampler: BandSampler) -> None:
        dataset = self.train_dataset
        wanted = self.config.band_sampling and hasattr(dataset, "bands") and self.config.verify_batches > 0
        if not wanted or self.rank != 0:  # every rank shares one global stream: rank 0 checks it
            return
        result = verify_sampler(sampler, [b.name for b in dataset.bands], [b.target_share for b in dataset.bands],
                                self.config.verify_batches, self.config.batch_size * self.world_size,
                                self.out_dir / "sampler_verification.json")
        self._print(format_verification(result))

    def _print(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text)

    def _autocast(self):
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- the loop -------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        config = self.config
        torch.manual_seed(config.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if config.dtype == "bfloat16" and not bf16_is_native(self.device):
            self._print(f"WARNING: dtype bfloat16 on a {self.device.type} without native bf16 runs emulated, many "
                        "times slower than float32; dtype = 'auto' picks float32 here.")
        for flag, why in RISKY_ENV_FLAGS.items():
            if os.environ.get(flag, "0") not in ("", "0"):
                self._print(f"WARNING: {flag}={os.environ[flag]} is set: {why}. Unset it if gradients go NaN.")
        if hasattr(self.model, "set_gradient_checkpointing"):
            self.model.set_gradient_checkpointing(config.gradient_checkpointing, policy=config.checkpoint_policy)
        if self.world_size > 1 and config.strategy == "fsdp":
            if not is_sharded(self.model):  # tools/train.py loads sharded (distributed.load_sharded)
                shard_model(self.model, cpu_offload=config.cpu_offload)  # parameters become sharded DTensors
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                      weight_decay=config.weight_decay)
        total = self.total_steps()
        warmup = math.ceil(config.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total))
        sampler = self._sampler()
        step, metrics, skipped = self._resume(optimizer, scheduler, sampler)
        if step == 0:
            self._verify_sampler(sampler)
        model = self.model.train()
        if self.world_size > 1 and not is_sharded(model):  # wrapped after resuming: every rank starts alike
            model = nn.parallel.DistributedDataParallel(model)
        bar = tqdm(total=total, initial=step, desc="train", disable=not config.progress or self.rank != 0,
                   dynamic_ncols=True)
        start = time.perf_counter()
        with self._heap_released_in_layers():
            self._loop(model, optimizer, scheduler, sampler, step, metrics, skipped, bar)
        bar.close()
        return self._finish(metrics, time.perf_counter() - start)

    def _heap_released_in_layers(self):
        layers = getattr(getattr(self.model, "model", None), "layers", [])
        every = self.config.heap_release_every if self.release_heap and self.config.heap_release == "layers" else 0
        return released_every(layers, every)

    def _loop(self, model, optimizer, scheduler, sampler, step, metrics, skipped, bar) -> None:
        """Optimizer steps from `step` (0, or where a checkpoint left off) to the end."""
        config, total = self.config, self.total_steps()
        draw = iter(sampler)
        while step < total:
            t0 = time.perf_counter()
            micro_batches = [collate([self.train_dataset[next(draw)] for _ in range(config.batch_size)], self.pad_id)
                             for _ in range(config.grad_accum)]
            lr = scheduler.get_last_lr()[0]
            loss, grad_norm, tokens = self._step(model, micro_batches, optimizer)
            step += 1
            record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                      "step_seconds": time.perf_counter() - t0}
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                skipped += 1
                record["skipped"] = True
                if skipped > config.max_nonfinite_steps:
                    self._stop_nonfinite(step, loss, grad_norm, micro_batches)
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if config.eval_every and self.eval_dataset is not None and step % config.eval_every == 0:
                record["eval_loss"] = self.evaluate_loss()
            metrics.append(record)
            self._log(record, bar)
            if step % config.save_every == 0 or step == total:
                self._save(step, optimizer, scheduler, sampler, metrics, skipped)

    def _step(self, model: nn.Module, micro_batches: list[dict], optimizer) -> tuple[float, float, int]:
        """Forward/backward every micro-batch against one denominator; clip; step unless non-finite."""
        config = self.config
        weights = torch.cat([mb["weight"] for mb in micro_batches])
        denominator = torch.tensor(float(len(weights)) if config.loss_denominator == "examples"
                                   else float(weights.sum()), device=self.device)
        if self.world_size > 1:
            dist.all_reduce(denominator)  # the step's denominator covers every rank's examples
        loss_total = torch.zeros((), device=self.device)
        tokens = 0
        for index, mb in enumerate(micro_batches):
            tokens += int(mb["lengths"].sum())  # counted on the CPU: no device sync per micro-batch
            mb = {k: mb[k].to(self.device) for k in ("input_ids", "labels", "weight")}
            self._release_heap()
            with (self._gradient_sync(model, last=index == len(micro_batches) - 1),
                  attention_kernel(config.attention_kernel)):
                with self._autocast():  # the forward only: autocast is not meant to wrap a backward
                    per_example = example_losses(model, mb)
                    loss = (per_example * mb["weight"]).sum() / denominator
                if self.release_heap:  # once the forward's temporaries are freed, before the backward allocates
                    loss.register_hook(lambda grad: release_free_memory())
                # DDP and FSDP average gradients over ranks; scaling by world size makes that the global sum.
                (loss * self.world_size).backward()
            loss_total += loss.detach()
        if self.world_size > 1:
            dist.all_reduce(loss_total)
        # The norm before clipping, over every rank's shards when sharded (the global norm, as one process).
        grad_norm = whole(torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm))
        if bool(torch.isfinite(loss_total)) and bool(torch.isfinite(grad_norm)):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._release_heap()
        # else: a non-finite step never reaches the weights; its gradients stay for the diagnosis.
        return float(loss_total), float(grad_norm), tokens

    def _release_heap(self) -> None:
        if self.release_heap:
            release_free_memory()

    def _gradient_sync(self, model: nn.Module, last: bool):
        """Reduce gradients across ranks on the step's last micro-batch only (accumulate locally before)."""
        if self.world_size == 1:
            return nullcontext()
        if is_sharded(model):
            model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else model.no_sync()

    def _log(self, record: dict, bar) -> None:
        if self.rank != 0:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", gnorm=f"{record['grad_norm']:.2f}",
                        tok_s=f"{record['tokens'] / record['step_seconds']:.0f}")

    # -- evaluation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_loss(self) -> float:
        """Weighted held-out loss over the first `eval_examples` of the eval set (no generation)."""
        dataset, config = self.eval_dataset, self.config
        indices = list(range(min(len(dataset), config.eval_examples)))
        was_training = self.model.training
        self.model.eval()
        total, weight_sum = 0.0, 0.0
        for start in range(0, len(indices), config.batch_size):
            batch = collate([dataset[i] for i in indices[start:start + config.batch_size]], self.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                per_example = example_losses(self.model, batch)
            total += float((per_example * batch["weight"]).sum())
            weight_sum += float(batch["weight"].sum())
        self.model.train(was_training)
        return total / max(weight_sum, 1e-12)

    # -- checkpoints ----------------------------------------------------------------------------------------

    def _save(self, step, optimizer, scheduler, sampler, metrics, skipped) -> None:
        trainable, optimizer_state = whole_state(self.model, optimizer)  # every rank: gathers when sharded
        if self.rank == 0:
            state = {"step": step, "config": self.config.to_dict(), "scheduler": scheduler.state_dict(),
                     "sampler": sampler.state_dict(), "nonfinite_skipped": skipped, "metrics": metrics}
            save_checkpoint(self.out_dir, step, self.model, trainable, optimizer_state, state,
                            self.config.keep_checkpoints, self.config.model)
        if self.world_size > 1:
            dist.barrier()

    def _newest_intact_checkpoint(self) -> Path | None:
        """The newest checkpoint whose files match their manifest; damaged newer ones are named, skipped and
        left on disk. Raises when checkpoints exist but none is intact (starting afresh would discard them)."""
        damaged = []
        for folder in reversed(checkpoints(self.out_dir)):
            reason = checkpoint_damage(folder)
            if reason is None:
                return folder
            damaged.append(f"{folder.name}: {reason}")
            if self.rank == 0:
                message = f"skipping damaged checkpoint {folder}: {reason} (left on disk as it is)"
                warnings.warn(message, CheckpointWarning, stacklevel=2)
                self._print(f"WARNING: {message}")
        if damaged:
            raise CheckpointError(f"{self.out_dir}: no intact checkpoint to resume from ({'; '.join(damaged)}). "
                                  "Nothing was deleted: restore them, or move them aside to start afresh.")
        return None

    def _resume(self, optimizer, scheduler, sampler) -> tuple[int, list[dict], int]:
        newest = self._newest_intact_checkpoint()
        if newest is None:
            if self.rank == 0:
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            return 0, [], 0
        state = load_checkpoint(newest, self.model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        sampler_state = dict(state["sampler"], rank=self.rank)
        sampler.load_state_dict(sampler_state)
        metrics = state["metrics"]
        if self.rank == 0:  # forget logged steps after the checkpoint: they are about to be redone
            (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        self._print(f"resuming from {newest} (step {state['step']})")
        return state["step"], metrics, state["nonfinite_skipped"]

    def _save_adapter(self) -> None:
        """The final (or last finite) adapter in PEFT's layout; every rank calls it, rank 0 writes."""
        if any(True for _ in dora_layers(self.model)):
            values = whole_trainable(self.model) if is_sharded(self.model) else None
            if self.rank == 0:
                save_adapter(self.model, self.out_dir / "adapter", self.config.model, values=values)

    def _save_model(self) -> None:
        """A fully fine-tuned Qwen3 as an HF folder (out_dir/model); every rank calls it, rank 0 writes."""
        if isinstance(self.model, Qwen3ForCausalLM) and not any(True for _ in dora_layers(self.model)):
            values = whole_parameters(self.model) if is_sharded(self.model) else None
            if self.rank == 0:
                save_pretrained(self.model, None, self.out_dir / "model", values=values)

    def _finish(self, metrics: list[dict], seconds: float) -> TrainResult:
        self._save_adapter()
        self._save_model()
        if self.rank == 0:
            summary = write_training_summary(metrics, self.out_dir, self.config)
            tqdm.write(summary)
        finite = [m["loss"] for m in metrics if math.isfinite(m["loss"])]
        return TrainResult(len(metrics), metrics[-1]["loss"] if metrics else float("nan"),
                           sum(finite) / max(len(finite), 1), seconds, self.out_dir)

    # -- the NaN guard --------------------------------------------------------------------------------------

    def _stop_nonfinite(self, step, loss, grad_norm, micro_batches) -> None:
        lines = [f"step {step}: loss {loss}, gradient norm {grad_norm}; the update was not applied."]
        names = {id(p): n for n, p in self.model.named_parameters()}
        bad_param = next((names[id(p)] for p in self.params if p.grad is not None
                          and not torch.isfinite(local(p.grad)).all()), None)
        if bad_param is not None:
            lines.append(f"first parameter with a non-finite gradient: {bad_param}")
        module = self._first_nonfinite_module(micro_batches)
        lines.append(f"first module whose output went non-finite: {module}" if module else
                     "no module output was non-finite when the step's micro-batches were re-run forward")
        flags = [f"{k}={os.environ[k]} ({why})" for k, why in RISKY_ENV_FLAGS.items()
                 if os.environ.get(k, "0") not in ("", "0")]
        lines.append("environment flags known to cause this: " + ("; ".join(flags) if flags else "none set"))
        diagnosis = "\n".join(lines)
        if self.rank == 0:
            (self.out_dir / "nonfinite_diagnosis.txt").write_text(diagnosis + "\n")
        self._save_adapter()  # the weights are still finite: keep them
        raise NonFiniteError(diagnosis)

    @torch.no_grad()
    def _first_nonfinite_module(self, micro_batches: list[dict]) -> str | None:
        """Re-run the step's micro-batches forward with hooks; the first module (in execution order) whose
        output holds a NaN or Inf is where the trouble starts."""
        found: list[str] = []

        def hook(name):
            def check(module, args, output):
                if not found and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
                    found.append(name)
            return check

        handles = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules() if n]
        try:
            for mb in micro_batches:  # all of them: sharded ranks must run the same forwards
                with self._autocast():
                    self.model(mb["input_ids"].to(self.device))
        finally:
            for handle in handles:
                handle.remove()
        return found[0] if found else None
