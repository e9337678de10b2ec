"""The plan's timed probe: a few real optimizer steps of the run (weights loaded, nothing kept), their median
time projected over the run's steps."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..config import TrainConfig
from ..data.dataset import RunData
from ..train.run import train_from_config
from .report import Plan


def probe(config: TrainConfig, steps: int, result: Plan) -> Plan:
    """Run `steps` real optimizer steps (weights loaded, no checkpoint saved, in a temporary out_dir) and put
    the measured seconds per step into `result`: the median of the steps after the first, which warms up
    allocators and kernels."""
    with tempfile.TemporaryDirectory() as out_dir:
        probe_config = TrainConfig(**{**config.to_dict(), "out_dir": out_dir, "max_steps": steps,
                                      "save_every": 10**9, "verify_batches": 0, "eval_every": 0,
                                      "progress": False})
        train_from_config(probe_config, RunData.read(probe_config))
        lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    times = sorted(json.loads(line)["step_seconds"] for line in lines[1:] or lines)
    result.seconds_per_step = times[len(times) // 2]
    result.probe_steps = len(times)
    return result
