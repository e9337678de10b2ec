"""Where each optimizer step's record goes: `metrics.jsonl` always (the truth: one JSON line a step, what the
summary, the plan's probe and people's scripts read), and TensorBoard event files when the run asks for them
(TrainConfig.log = ["jsonl", "tensorboard"]; `pip install 'stratos_lite[tensorboard]'`), under
`out_dir/tensorboard`. Only rank 0 writes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..config import ConfigError
from ..storage.atomic import storage_errors_named, write_text

TENSORBOARD_FOLDER = "tensorboard"
# metrics.jsonl key -> TensorBoard tag, for each per-step scalar.
STEP_SCALARS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr",
                "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss"}
# evaluate()'s metrics -> TensorBoard tag suffix, for the generation metrics of each engine.
GENERATION_SCALARS = ("direction_accuracy", "mae", "spearman", "psr", "think_empty_rate", "parse_failures",
                      "examples_per_s")


def tensorboard_writer(folder: str | Path, purge_step: int | None = None):
    """A SummaryWriter for `folder`; events of steps >= purge_step that an earlier run logged are dropped
    (they are about to be logged again after resuming). Refused with the install line when tensorboard is
    missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log", "setting 'log' asks for 'tensorboard', which is not installed: "
                                 "pip install 'stratos_lite[tensorboard]'")
    from torch.utils.tensorboard import SummaryWriter  # only with tensorboard installed

    return SummaryWriter(str(folder), purge_step=purge_step)


class MetricsLog:
    """The run's step records; a no-op on ranks other than 0."""

    def __init__(self, out_dir: str | Path, sinks: list[str], writes: bool):
        self.jsonl = Path(out_dir) / "metrics.jsonl"
        self.tensorboard_folder = Path(out_dir) / TENSORBOARD_FOLDER if "tensorboard" in sinks else None
        self.writes, self._board = writes, None
        if self.tensorboard_folder is not None and importlib.util.find_spec("tensorboard") is None:
            tensorboard_writer(self.tensorboard_folder)  # raises the install line on every rank, before training

    def records_until(self, step: int, warn=print) -> list[dict]:
        """The records of steps 1..step as metrics.jsonl holds them (what a resumed run's summary continues
        from; later lines are about to be redone). A file that holds fewer, as one copied without its out_dir
        would, gives what it has, with a warning through `warn`."""
        records = []
        if self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill is past every checkpoint
                    break
                if record["step"] > step:
                    break
                records.append(record)
        if len(records) < step:
            warn(f"WARNING: {self.jsonl} holds {len(records)} of the {step} steps before the checkpoint; the "
                 "summary covers those")
        return records

    def start(self, records: list[dict]) -> None:
        """From a run's beginning (no records) or from a checkpoint's records: steps after them are redone."""
        if not self.writes:
            return
        if records:
            write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in records))
        else:
            self.jsonl.unlink(missing_ok=True)
        if self.tensorboard_folder is not None:
            self._board = tensorboard_writer(self.tensorboard_folder, purge_step=len(records) + 1)

    def write(self, record: dict) -> None:
        if not self.writes:
            return
        with storage_errors_named(self.jsonl), open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._board is not None:
            scalars = {**record, "tokens_per_s": record["tokens"] / record["step_seconds"]}
            for key, tag in STEP_SCALARS.items():
                if key in scalars:
                    self._board.add_scalar(tag, scalars[key], record["step"])
            self._board.flush()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None


def log_generation_metrics(folder: str | Path, step: int, columns: dict[str, dict]) -> None:
    """evaluate()'s metrics of each engine (`columns`: name -> metrics) as TensorBoard scalars at `step`,
    tagged generation/<engine>/<metric>."""
    board = tensorboard_writer(folder)
    for engine, values in columns.items():
        for key in GENERATION_SCALARS:
            if values.get(key) is not None:
                board.add_scalar(f"generation/{engine}/{key}", values[key], step)
    board.close()
