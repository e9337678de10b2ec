"""The one timing helper the benchmarks share."""

import statistics
import time


def median_seconds(run, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `run()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
