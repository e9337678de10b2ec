"""A newcomer's first hour: the installed `stratos-lite` command and TensorBoard events (the README's Python
example runs in test_docs.py)."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_trainer import quick_config
from train_child import build

import stratos_lite as sl
from stratos_lite.commands import parser
from stratos_lite.train.metrics_log import log_generation_metrics
from stratos_lite.train.trainer import Trainer

ROOT = Path(__file__).parent.parent


def command(*args, **kwargs) -> subprocess.CompletedProcess:
    """The console script pip installed (pyproject's [project.scripts]), run as a user runs it."""
    executable = shutil.which("stratos-lite")
    assert executable, "stratos-lite is not on PATH: pip install -e . installs it"
    return subprocess.run([executable, *args], capture_output=True, text=True, **kwargs)


def test_installed_command_runs_each_subcommand_and_names_bad_input(tmp_path):
    result = command("--help")
    assert result.returncode == 0
    for name in ("demo", "train", "plan", "evaluate", "score", "merge", "export", "make-demo-data"):
        assert re.search(rf"^\s+{name}\s", result.stdout, re.MULTILINE), name
        with pytest.raises(SystemExit) as exit_status:  # each one's --help, in this process (torch is loaded)
            parser().parse_args([name, "--help"])
        assert exit_status.value.code == 0
    made = command("make-demo-data", "--out", str(tmp_path / "data"), "--train-articles", "2", "--eval-articles", "1",
                   "--vocab-size", "300")
    assert made.returncode == 0 and (tmp_path / "data" / "train.jsonl").is_file()
    bad = command("train", "--config", str(tmp_path / "missing.toml"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
    wrong = tmp_path / "run.toml"
    wrong.write_text("lr = 'fast'\n")
    bad = command("plan", "--config", str(wrong))
    assert bad.returncode == 2
    assert bad.stderr == f"error: {wrong}: setting 'lr' = 'fast': expected a number, > 0 and finite\n"


def test_module_and_tool_script_are_the_same_command():
    by_module = subprocess.run([sys.executable, "-m", "stratos_lite", "train", "--help"], capture_output=True,
                               text=True)
    by_tool = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--help"], capture_output=True,
                             text=True)
    assert by_module.returncode == by_tool.returncode == 0
    assert by_module.stdout.split("options:")[1] == by_tool.stdout.split("options:")[1]
    # Every setting with its default and what it allows, from the validation tables.
    for spec in dataclasses.fields(sl.TrainConfig):
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        assert f"  {spec.name} = {json.dumps(default)}: " in by_module.stdout, spec.name
    assert "  lr = 1e-05: a number, > 0 and finite\n" in by_module.stdout
    assert "  dtype = \"bfloat16\": a string, one of 'bfloat16', 'float32', 'auto'\n" in by_module.stdout


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_hold_the_logged_values(demo_dir, tmp_path):
    model, dataset, tok = build(str(demo_dir), dropout=0.0)
    eval_set = sl.ScoredDataset.from_jsonl(demo_dir / "eval.jsonl", tok, max_len=256)
    config = quick_config(tmp_path, max_steps=4, eval_every=2, eval_examples=4, log=["jsonl", "tensorboard"])
    Trainer(model, dataset, config, eval_dataset=eval_set, pad_id=tok.pad_id).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = scalars(tmp_path / "tensorboard")
    for tag, key in [("train/loss", "loss"), ("train/grad_norm", "grad_norm"), ("train/lr", "lr")]:
        assert logged[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-12)) for r in records]
    assert logged["train/tokens_per_s"] == [(r["step"], pytest.approx(r["tokens"] / r["step_seconds"], rel=1e-6))
                                            for r in records]
    assert logged["eval/loss"] == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in records
                                   if "eval_loss" in r]
    log_generation_metrics(tmp_path / "tensorboard", 4, {"adapters on": {"spearman": 0.75, "mae": 1.25}})
    logged = scalars(tmp_path / "tensorboard")
    assert logged["generation/adapters on/spearman"] == [(4, 0.75)]
    assert logged["generation/adapters on/mae"] == [(4, 1.25)]


def test_tensorboard_without_the_package_is_refused_before_training(demo_dir, tmp_path, monkeypatch):
    import stratos_lite.train.metrics_log as metrics_log

    monkeypatch.setattr(metrics_log.importlib.util, "find_spec", lambda name: None)
    model, dataset, tok = build(str(demo_dir), dropout=0.0)
    with pytest.raises(sl.ConfigError, match=r"pip install 'stratos_lite\[tensorboard\]'"):
        Trainer(model, dataset, quick_config(tmp_path, log=["jsonl", "tensorboard"]), pad_id=tok.pad_id)
    with pytest.raises(sl.ConfigError, match=r"setting 'log' = \['tensorboard'\]: expected a list of non-empty "
                                             r"strings, a list holding \"jsonl\""):
        quick_config(tmp_path, log=["tensorboard"])
