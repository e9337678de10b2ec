"""The one timing helper the benchmarks share."""

import statistics
import time

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
