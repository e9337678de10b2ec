"""The timing helpers the benchmarks share."""

import json
import statistics
import time
from pathlib import Path

import torch


def median_seconds(run, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `run()` over `repeats` calls, after `warmup` untimed calls. On a GPU the device is
    synchronized at both ends of each call, so the time is the work's, not its launch's."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        run()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_records(out_dir) -> list[dict]:
    """A training run's step records (its metrics.jsonl: step_seconds, tokens, loss, ...)."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
