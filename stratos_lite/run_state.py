"""Where a run stands between two optimizer steps, as one value: what the loop carries from step to step,
what a checkpoint stores besides tensors, and what resuming puts back."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampler import BandSampler


@dataclass
class RunState:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: BandSampler
    step: int = 0  # optimizer steps taken
    metrics: list[dict] = field(default_factory=list)  # one record per step so far (metrics.jsonl's lines)
    nonfinite_skipped: int = 0  # steps whose update the NaN guard withheld

    def to_json(self) -> dict:
        """The position as plain values (a checkpoint's state.json, beside the config)."""
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "nonfinite_skipped": self.nonfinite_skipped, "metrics": self.metrics}

    def load_json(self, saved: dict, rank: int) -> None:
        """Back to a saved position; the sampler continues this rank's slice of the global stream."""
        self.step, self.metrics, self.nonfinite_skipped = saved["step"], saved["metrics"], saved["nonfinite_skipped"]
        self.scheduler.load_state_dict(saved["scheduler"])
        self.sampler.load_state_dict(dict(saved["sampler"], rank=rank))
