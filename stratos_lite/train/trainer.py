"""The training loop: one optimizer step after another, the same code for one process, DDP and FSDP.

Each step draws its `grad_accum` micro-batches up front and fixes ONE loss denominator for the whole step
(the number of examples, or the sum of their weights, over all ranks), then backpropagates micro-batch by
micro-batch. So k micro-batches of b give the gradient of one batch of k x b, whatever their lengths.

    per-example loss = mean token cross-entropy over its completion
    step loss        = sum(weight x per-example loss) / denominator

What was asked is in config.py, what model trains and how it is held in builder.py, how the work spreads over
ranks in strategy.py, where the run stands in run_state.py, what a non-finite step reports in guard.py, and how
checkpoints sit on disk in checkpoint.py.
"""

from __future__ import annotations

import functools
import math
import signal
import time
import warnings
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError, TrainConfig
from ..data.batch import Batch, collate
from ..data.packing import estimate_padding, filler_row, pack_step
from ..data.sampler import BandSampler, format_verification, sampler_for, verify_for
from ..model.attention_report import attention_line
from ..model.folders import save_pretrained
from ..model.lora import has_adapters
from ..model.peft_files import save_adapter
from ..model.qwen3 import Qwen3ForCausalLM
from ..storage.atomic import write_text
from ..storage.lock import held_by_rank0
from .builder import ready_for_training
from .checkpoint import (
    CheckpointWarning,
    capture_rng,
    newest_intact_checkpoint,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .device import attention_kernel, bf16_is_native, compute_dtype, determinism_gap, deterministic_algorithms
from .guard import NonFiniteError, diagnosis, first_nonfinite_gradient, first_nonfinite_module, risky_flags
from .heap import release_free_memory, released_every
from .loss import example_losses
from .metrics_log import MetricsLog
from .preemption import Interrupted, StopRequests
from .run_state import RunState, changes_since, data_identity
from .schedule import cosine_with_warmup, optimizer_steps
from .summary import write_training_summary


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
        self.device = next(model.parameters()).device
        self.release_heap = self.device.type == "cpu" and config.heap_release != "off"
        self.strategy = ready_for_training(model, config)  # the builder's settings; one process, DDP or FSDP
        self.log = MetricsLog(self.out_dir, config.log, writes=self.strategy.is_main)
        self.params = [p for p in model.parameters() if p.requires_grad]  # after sharding: this rank's shards
        if not self.params:
            raise ValueError("nothing to train: no parameter requires grad (apply_dora, or mode='full')")
        config.check_packing(getattr(train_dataset, "lengths", None))

    def total_steps(self) -> int:
        return optimizer_steps(self.config, len(self.train_dataset), self.strategy.world_size)

    # -- the loop -------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Train to the end (resuming from out_dir's newest checkpoint when there is one) and write the
        adapter or model, the summary and the loss curve. SIGTERM or SIGINT stops after the current step with
        a checkpoint (preemption.Interrupted); out_dir is locked against a second run for the duration."""
        with (held_by_rank0(self.out_dir, self.strategy), closing(self.log),
              deterministic_algorithms(self.config.deterministic)):
            return self._train()

    def _train(self) -> TrainResult:
        config = self.config
        torch.manual_seed(config.seed)
        self._warn_about_environment()
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                      weight_decay=config.weight_decay)
        total = self.total_steps()
        warmup = math.ceil(config.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total))
        run = RunState(optimizer, scheduler, self._sampler())
        self._resume(run)
        self._report_data()
        if run.step == 0:
            self._verify_sampler(run.sampler)
        self.model.train()
        bar = tqdm(total=total, initial=run.step, desc="train", dynamic_ncols=True,
                   disable=not config.progress or not self.strategy.is_main)
        start = time.perf_counter()
        with self._heap_released_in_layers(), StopRequests() as stop, closing(bar):
            draw = iter(run.sampler)
            while run.step < total:
                self._train_one_step(run, draw, bar)
                if run.step < total and self.strategy.any_rank(stop.received is not None):
                    self._stop_on_signal(run, stop.received)
        return self._finish(run.metrics, time.perf_counter() - start)

    def _train_one_step(self, run: RunState, draw, bar) -> None:
        """Draw the step's micro-batches, take the step, log it, evaluate and save when it is time."""
        config, t0 = self.config, time.perf_counter()
        micro_batches = self.lay_out([self.train_dataset[next(draw)]
                                      for _ in range(config.batch_size * config.grad_accum)])
        lr = run.scheduler.get_last_lr()[0]
        loss, grad_norm, tokens = self.step(micro_batches, run.optimizer)
        run.step += 1
        record = {"step": run.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                  "step_seconds": time.perf_counter() - t0}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            run.nonfinite_skipped += 1
            record["skipped"] = True
            if run.nonfinite_skipped > config.max_nonfinite_steps:
                self._stop_nonfinite(run.step, loss, grad_norm, micro_batches)
            run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        if config.eval_every and self.eval_dataset is not None and run.step % config.eval_every == 0:
            record["eval_loss"] = self.evaluate_loss()
        if run.recipe_changes:  # the first step after resuming under a changed recipe records the changes
            record["recipe_changes"], run.recipe_changes = run.recipe_changes, []
        run.metrics.append(record)
        self._log(record, bar)
        if run.step % config.save_every == 0 or run.step == self.total_steps():
            self._save(run)

    def lay_out(self, items: list[dict]) -> list[Batch]:
        """A step's drawn examples as its forwards: grad_accum padded micro-batches of batch_size, or packed
        rows (packing.py), as many on every rank (filler rows where a rank's examples packed into fewer), each
        with its loss positions."""
        if not self.config.packing:
            size = self.config.batch_size
            forwards = [collate(items[start:start + size], self.pad_id) for start in range(0, len(items), size)]
        else:
            rows = pack_step(items, self.config.row_tokens)
            forwards = rows + [filler_row(self.pad_id)] * (self.strategy.max_over_ranks(len(rows)) - len(rows))
        return [batch.with_loss_positions() for batch in forwards]  # found here, on the CPU (data/batch.py)

    def step(self, micro_batches: list[Batch], optimizer) -> tuple[float, float, int]:
        """Forward/backward every micro-batch against one denominator; clip; step unless non-finite."""
        config, strategy = self.config, self.strategy
        weights = torch.cat([mb.weight for mb in micro_batches])
        denominator = strategy.sum_over_ranks(torch.tensor(
            float(len(weights)) if config.loss_denominator == "examples" else float(weights.sum()),
            device=self.device))
        loss_total = torch.zeros((), device=self.device)
        tokens = 0
        for index, mb in enumerate(micro_batches):
            tokens += int(mb.lengths.sum())  # counted on the CPU: no device sync per micro-batch
            mb = self._on_device(mb)
            self._release_heap()
            with (strategy.gradient_sync(last=index == len(micro_batches) - 1),
                  attention_kernel(config.attention_kernel)):
                with self._autocast():  # the forward only: autocast is not meant to wrap a backward
                    per_example = example_losses(strategy.forward, mb, config.loss_chunk)
                    loss = (per_example * mb.weight).sum() / denominator
                if self.release_heap:  # once the forward's temporaries are freed, before the backward allocates
                    loss.register_hook(lambda grad: release_free_memory())
                strategy.backward(loss)
            loss_total += loss.detach()
        strategy.sum_over_ranks(loss_total)
        grad_norm = strategy.clip(self.params, config.max_grad_norm)  # the global norm, before clipping
        # The step's one wait for the device: both figures at once, for the log and the finite check.
        loss_value, norm_value = torch.stack([loss_total, grad_norm.to(loss_total)]).tolist()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._release_heap()
        # else: a non-finite step never reaches the weights; its gradients stay for the diagnosis.
        return loss_value, norm_value, tokens

    # -- around the loop ------------------------------------------------------------------------------------

    def _sampler(self) -> BandSampler:
        return sampler_for(self.train_dataset, self.config, self.strategy.process_rank, self.strategy.world_size)

    def _verify_sampler(self, sampler: BandSampler) -> None:
        if self.strategy.is_main:  # every rank shares one global stream: rank 0 checks it
            result = verify_for(self.train_dataset, self.config, sampler, self.strategy.world_size,
                                self.out_dir / "sampler_verification.json")
            if result is not None:
                self._print(format_verification(result))

    def _report_data(self) -> None:
        """The dataset's report (ScoredDataset has one) in out_dir, and printed with what padding costs the run
        and how much of the model trains."""
        report = getattr(self.train_dataset, "report", None)
        if report is None or not self.strategy.is_main:
            return
        report.write(self.out_dir)
        if self.config.progress:
            config, lengths = self.config, self.train_dataset.lengths
            padding = estimate_padding(lengths, config.batch_size, config.grad_accum,
                                       max(config.row_tokens, max(lengths)))
            trained, total = sum(p.numel() for p in self.params), sum(p.numel() for p in self.model.parameters())
            self._print(report.to_markdown() + "padding: " + padding.describe()
                        + ("" if config.packing else " (packing = true would remove it)")
                        + f"\ntraining {trained:,} of {total:,} parameters ({100 * trained / total:.3f} %)")

    def _warn_about_environment(self) -> None:
        if self.config.dtype == "bfloat16" and not bf16_is_native(self.device):
            self._print(f"WARNING: dtype bfloat16 on a {self.device.type} without native bf16 runs emulated, many "
                        "times slower than float32; dtype = 'auto' picks float32 here.")
        for flag in risky_flags():
            self._print(f"WARNING: {flag} is set. Unset it if gradients go NaN.")
        if gap := determinism_gap(self.config.deterministic, self.config.attention_kernel, self.device):
            self._print(f"WARNING: {gap}")
        if self.device.type != "cpu":  # which kernel SDPA gives training here decides memory, speed and NaNs
            self._print(self._attention_line)

    @functools.cached_property
    def compute_dtype(self) -> torch.dtype:
        """What the forward computes in on the model's device (resolved once, not per micro-batch)."""
        return compute_dtype(self.config.dtype, self.device)

    @functools.cached_property
    def _attention_line(self) -> str:
        """Found once (a profiled attention call) for the start of a GPU run and for the NaN diagnosis."""
        config = getattr(self.model, "config", None)
        if config is None:
            return "attention: unknown (the model has no Qwen3 config)"
        return attention_line(config, self.device, self.compute_dtype, self.config.attention_kernel)

    def _on_device(self, batch: Batch) -> Batch:
        """The batch on the model's device; to a GPU through pinned memory, so the copy does not wait for it."""
        return batch.to(self.device, pinned=self.device.type == "cuda")

    def _print(self, text: str) -> None:
        if self.strategy.is_main:
            tqdm.write(text)

    def _autocast(self):
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _release_heap(self) -> None:
        if self.release_heap:
            release_free_memory()

    def _heap_released_in_layers(self):
        layers = getattr(getattr(self.model, "model", None), "layers", [])
        every = self.config.heap_release_every if self.release_heap and self.config.heap_release == "layers" else 0
        return released_every(layers, every)

    def _log(self, record: dict, bar) -> None:
        self.log.write(record)
        if not self.strategy.is_main:
            return
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", gnorm=f"{record['grad_norm']:.2f}",
                        tok_s=f"{record['tokens'] / record['step_seconds']:.0f}")

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
            batch = batch.with_loss_positions().to(self.device)
            with self._autocast():
                per_example = example_losses(self.model, batch, config.loss_chunk)
            total += float((per_example * batch.weight).sum())
            weight_sum += float(batch.weight.sum())
        self.model.train(was_training)
        return total / max(weight_sum, 1e-12)

    # -- checkpoints and outputs ----------------------------------------------------------------------------

    def _stop_on_signal(self, run: RunState, signum: int | None) -> None:
        """Every rank: checkpoint the step just taken (unless it was saved already) and raise Interrupted."""
        if run.step % self.config.save_every:
            self._save(run)
        cause = signal.Signals(signum).name if signum else "a stop signal on another rank"
        raise Interrupted(f"stopped by {cause} after step {run.step} of {self.total_steps()}; checkpoint "
                          f"{self.out_dir / f'checkpoint-{run.step:06d}'}. Run the same command again to resume "
                          "from it.", signum or signal.SIGTERM)

    def _save(self, run: RunState) -> None:
        """A checkpoint of `run`: every rank takes part in gathering whole state, rank 0 writes it."""
        trainable, optimizer_state = self.strategy.whole_state(run.optimizer)
        rng_by_rank = self.strategy.gather_to_main(capture_rng())  # each rank continues its own dropout draws
        if self.strategy.is_main:
            state = {**run.to_json(), "config": self.config.to_dict(), "world_size": self.strategy.world_size,
                     "data": data_identity(self.train_dataset)}
            save_checkpoint(self.out_dir, run.step, self.model, trainable, optimizer_state, state,
                            self.config.keep_checkpoints, self.config.model, rng_by_rank)
        self.strategy.barrier()

    def _resume(self, run: RunState) -> None:
        """Continue `run` from the newest intact checkpoint in out_dir, or start it afresh."""
        newest = newest_intact_checkpoint(self.out_dir, passed_over=self._warn_damaged)
        if newest is None:
            self.log.start([])
            return
        saved = read_checkpoint(newest, self.model)
        run.recipe_changes = changes_since(saved.state, self.config, self.train_dataset, self.strategy.world_size)
        if run.recipe_changes and not self.config.allow_recipe_change:
            raise ConfigError("allow_recipe_change", f"{newest}: the recipe changed since this checkpoint: "
                              f"{'; '.join(run.recipe_changes)}. Resume with the checkpoint's settings, start in "
                              "a new out_dir, or set allow_recipe_change = true to continue with the changes.")
        for change in run.recipe_changes:
            self._print(f"WARNING: resuming with a changed recipe: {change}")
        self.strategy.restore_state(run.optimizer, saved.trainable, saved.optimizer_state)
        restore_rng(saved.rng, self.strategy.process_rank, self.strategy.world_size)
        run.load_json(saved.state)
        run.metrics = self.log.records_until(run.step, warn=self._print)
        self.log.start(run.metrics)  # steps logged after the checkpoint are forgotten: they are about to be redone
        self._print(f"resuming from {newest} (step {run.step})")

    def _warn_damaged(self, folder: Path, reason: str) -> None:
        if self.strategy.is_main:
            message = f"skipping damaged checkpoint {folder}: {reason} (left on disk as it is)"
            warnings.warn(message, CheckpointWarning, stacklevel=4)
            self._print(f"WARNING: {message}")

    def _save_adapter(self) -> None:
        """The final (or last finite) adapter in PEFT's layout; every rank calls it, rank 0 writes."""
        if has_adapters(self.model):
            values = self.strategy.whole_trainable()
            if self.strategy.is_main:
                save_adapter(self.model, self.out_dir / "adapter", self.config.model, values=values)

    def _save_model(self) -> None:
        """A fully fine-tuned Qwen3 as an HF folder (out_dir/model); every rank calls it, rank 0 writes."""
        if isinstance(self.model, Qwen3ForCausalLM) and not has_adapters(self.model):
            values = self.strategy.whole_parameters()
            if self.strategy.is_main:
                save_pretrained(self.model, None, self.out_dir / "model", values=values)

    def _finish(self, metrics: list[dict], seconds: float) -> TrainResult:
        self._save_adapter()
        self._save_model()
        if self.strategy.is_main:
            tqdm.write(write_training_summary(metrics, self.out_dir, self.config))
        finite = [m["loss"] for m in metrics if math.isfinite(m["loss"])]
        return TrainResult(len(metrics), metrics[-1]["loss"] if metrics else float("nan"),
                           sum(finite) / max(len(finite), 1), seconds, self.out_dir)

    def _stop_nonfinite(self, step: int, loss: float, grad_norm: float, micro_batches: list[Batch]) -> None:
        """The NaN guard's stop: diagnose (guard.py), keep the still-finite adapter, raise on every rank."""
        def run_forwards():  # all of them: sharded ranks must run the same forwards
            for mb in micro_batches:
                with self._autocast():
                    example_losses(self.model, self._on_device(mb), self.config.loss_chunk)

        bad_parameter = first_nonfinite_gradient(self.model, self.params, self.strategy.local)
        report = diagnosis(step, loss, grad_norm, bad_parameter, first_nonfinite_module(self.model, run_forwards),
                           self._attention_line)
        if self.strategy.is_main:
            write_text(self.out_dir / "nonfinite_diagnosis.txt", report + "\n")
        self._save_adapter()  # the weights are still finite: keep them
        raise NonFiniteError(report)
