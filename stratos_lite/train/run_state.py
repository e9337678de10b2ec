"""Where a run stands between two optimizer steps, as one value: what the loop carries from step to step,
what a checkpoint stores besides tensors, and what resuming puts back; and whether a checkpoint still
belongs to the run that wants to resume it (the same recipe, the same data)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import TrainConfig, recipe_changes
from ..data.sampler import BandSampler


@dataclass
class RunState:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: BandSampler
    step: int = 0  # optimizer steps taken
    metrics: list[dict] = field(default_factory=list)  # one record per step so far (metrics.jsonl's lines)
    nonfinite_skipped: int = 0  # steps whose update the NaN guard withheld
    recipe_changes: list[str] = field(default_factory=list)  # accepted on resuming; the next record notes them

    def to_json(self) -> dict:
        """The position as plain values (a checkpoint's state.json, beside the config)."""
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "nonfinite_skipped": self.nonfinite_skipped}

    def load_json(self, saved: dict) -> None:
        """Back to a saved position; the sampler continues its own rank's slice of the global stream."""
        self.step, self.nonfinite_skipped = saved["step"], saved["nonfinite_skipped"]
        self.scheduler.load_state_dict(saved["scheduler"])
        self.sampler.load_state_dict(saved["sampler"])


def data_identity(dataset) -> dict:
    """What identifies the training data in a checkpoint: its size and, when read from a file, the file's
    SHA-256 (ScoredDataset's report carries it)."""
    return {"examples": len(dataset), "sha256": getattr(getattr(dataset, "report", None), "sha256", "")}


def changes_since(saved: dict, config: TrainConfig, dataset, world_size: int) -> list[str]:
    """How the run about to resume differs from a checkpoint's state.json in what it computes: each recipe
    setting (config.recipe_changes) and the data, as `name: checkpoint value -> new value`."""
    changes = recipe_changes(saved["config"], config, saved.get("world_size", world_size), world_size)
    before, now = saved.get("data", {}), data_identity(dataset)
    for key, label in (("examples", "train_data examples"), ("sha256", "train_data content (SHA-256)")):
        if before.get(key) and now[key] and before[key] != now[key]:
            changes.append(f"{label}: {before[key]!r} -> {now[key]!r}")
    return changes
