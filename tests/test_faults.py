"""Faults a long run meets: a full disk, preemption, two runs in one folder, a changed recipe, a kill while an
output is written, data values out of range. `pytest -k fault` runs this battery."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from test_fsdp import final_tensors, free_port, losses
from test_trainer import child, final_adapter, quick_config
from train_child import build

import stratos_lite as sl
from stratos_lite.config import ConfigError
from stratos_lite.data.dataset import ScoredDataset
from stratos_lite.data.records import DataError
from stratos_lite.data.task import Band
from stratos_lite.export import gguf_file as gguf_module
from stratos_lite.model import folders as folders_module
from stratos_lite.model import peft_files as peft_module
from stratos_lite.storage.atomic import WriteError, staged_file
from stratos_lite.storage.lock import LockError, StaleLockWarning
from stratos_lite.train import checkpoint as checkpoint_module
from stratos_lite.train.checkpoint import checkpoint_damage, checkpoints
from stratos_lite.train.preemption import StopRequests
from stratos_lite.train.trainer import Trainer


def hidden_leftovers(folder) -> list[str]:
    """Temporary outputs (.NAME.tmp, .NAME.partial, .NAME.old) left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock")


class FillsDiskAt(torch.utils.data.Dataset):
    """The data set, except that drawing item `at` fills the disk holding `ballast`, leaving `leave` bytes."""

    def __init__(self, dataset, ballast, at: int, leave: int):
        self.dataset, self.bands, self.band_ids = dataset, dataset.bands, dataset.band_ids
        self.ballast, self.at, self.leave, self.draws = ballast, at, leave, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.draws += 1
        if self.draws == self.at:
            fill(self.ballast, self.leave)
        return self.dataset[index]


def fill(ballast, leave: int) -> None:
    """Write `ballast` until the file system refuses (ENOSPC), then give `leave` bytes back."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                break
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a disk that really fills up."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN; "
                    "test_fault_checkpoint_write_error_leaves_older_checkpoints forces the same error without it")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_fault_full_disk_stops_naming_the_path_and_resumes_as_uninterrupted(demo_dir, tmp_path, small_disk):
    model, dataset, tok = build(str(demo_dir), dropout=0.1)
    Trainer(model, dataset, quick_config(tmp_path / "straight", save_every=2), pad_id=tok.pad_id).train()
    out = small_disk / "run"
    model, dataset, tok = build(str(demo_dir), dropout=0.1)
    filling = FillsDiskAt(dataset, small_disk / "ballast", at=9, leave=0)  # in step 3 (4 draws a step)
    with pytest.raises(WriteError, match=r"checkpoint-000004: cannot write: No space left on device \[ENOSPC\]"):
        Trainer(model, filling, quick_config(out, save_every=2), pad_id=tok.pad_id).train()
    assert [p.name for p in checkpoints(out)] == ["checkpoint-000002"]
    assert checkpoint_damage(out / "checkpoint-000002") is None and hidden_leftovers(out) == []
    (small_disk / "ballast").unlink()  # space freed: the same run again resumes and ends as the straight one
    model, dataset, tok = build(str(demo_dir), dropout=0.1)
    Trainer(model, dataset, quick_config(out, save_every=2), pad_id=tok.pad_id).train()
    straight, resumed = final_adapter(tmp_path / "straight"), final_adapter(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_fault_checkpoint_write_error_leaves_older_checkpoints(demo_dir, tmp_path, monkeypatch):
    """The same without root: the second checkpoint's first file write answers ENOSPC."""
    real, calls = checkpoint_module.save_file, {"n": 0}

    def full_on_second_checkpoint(tensors, path, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # three files a checkpoint (trainable, optimizer, rng)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_on_second_checkpoint)
    model, dataset, tok = build(str(demo_dir), dropout=0.0)
    with pytest.raises(WriteError, match=r"checkpoint-000006: cannot write: No space left on device"):
        Trainer(model, dataset, quick_config(tmp_path), pad_id=tok.pad_id).train()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-000003"] and hidden_leftovers(tmp_path) == []


def test_fault_metrics_log_write_error_names_the_log(demo_dir, tmp_path, monkeypatch):
    import stratos_lite.train.metrics_log as metrics_log

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and mode == "a":
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_log, "open", full, raising=False)
    model, dataset, tok = build(str(demo_dir), dropout=0.0)
    with pytest.raises(WriteError, match=r"metrics\.jsonl: cannot write: Disk quota exceeded \[EDQUOT\]"):
        Trainer(model, dataset, quick_config(tmp_path), pad_id=tok.pad_id).train()


def test_fault_export_to_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch, tokenizer):
    model = sl.Qwen3ForCausalLM(sl.Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=64,
                                               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=16))
    target = sl.export_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32")
    before = target.read_bytes()
    real = gguf_module.encode

    def disk_fills(planned, qtype, imatrix=None):
        if planned.name.startswith("blk.1"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(planned, qtype, imatrix)

    monkeypatch.setattr(gguf_module, "encode", disk_fills)
    with pytest.raises(WriteError, match=r"m\.gguf: cannot write: No space left on device"):
        sl.export_gguf(model, tokenizer, target, quant="q8_0")
    assert target.read_bytes() == before and hidden_leftovers(tmp_path) == []


# -- preemption ----------------------------------------------------------------------------------------------

def wait_for_steps(out_dir, steps: int, process, deadline: float = 120) -> None:
    metrics, end = out_dir / "metrics.jsonl", time.time() + deadline
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < steps) and process.poll() is None:
        assert time.time() < end, "the run did not reach the step in time"
        time.sleep(0.01)


def test_fault_sigterm_checkpoints_the_current_step_and_resumes_bitwise(demo_dir, tmp_path):
    subprocess.run(child(demo_dir, tmp_path / "straight"), check=True)  # 8 steps, a checkpoint every 2
    out = tmp_path / "run"
    process = subprocess.Popen(child(demo_dir, out, slow=True), stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    stopped = len((out / "metrics.jsonl").read_text().splitlines())
    assert 3 <= stopped < 8 and not (out / "adapter").exists()
    assert checkpoints(out)[-1].name == f"checkpoint-{stopped:06d}"
    assert f"stopped by SIGTERM after step {stopped} of 8; checkpoint {out / f'checkpoint-{stopped:06d}'}" in err
    assert "Run the same command again to resume" in err
    subprocess.run(child(demo_dir, out), check=True)
    straight, resumed = final_adapter(tmp_path / "straight"), final_adapter(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))


def test_fault_second_signal_stops_at_once():
    # raise_signal delivers to this (the main) thread and runs the handler before it returns; a signal sent to
    # the process with os.kill may land on one of torch's threads and be handled later.
    with pytest.raises(KeyboardInterrupt), StopRequests() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT  # the first only asks the loop to stop after its step
        signal.raise_signal(signal.SIGINT)  # the second goes to Python's own handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_fault_sigterm_to_one_rank_stops_every_rank_at_one_checkpoint(demo_dir, tmp_path):
    """Under torchrun the ranks agree to stop after the same step, so none is left inside a collective."""
    out = tmp_path / "fsdp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), *child(demo_dir, out, "--batch-size", "2", "--dropout", "0", "--strategy", "fsdp",
                                        slow=True)[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(out, 3, launcher)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    rank1 = next(p for p in workers if "train_child.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    stopped = len((out / "metrics.jsonl").read_text().splitlines())
    assert checkpoints(out)[-1].name == f"checkpoint-{stopped:06d}" and not (out / "adapter").exists()
    launcher = subprocess.run([*command[:6], str(free_port()), *command[7:-1]], env=env, capture_output=True)
    assert launcher.returncode == 0, launcher.stderr[-3000:]
    subprocess.run(child(demo_dir, tmp_path / "one", "--batch-size", "4", "--dropout", "0"), check=True)
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one, resumed = final_tensors(tmp_path / "one", "dora"), final_tensors(out, "dora")
    assert all(torch.allclose(one[k], resumed[k], rtol=1e-4, atol=1e-4 * one[k].abs().max()) for k in one)


# -- one writer per out_dir -----------------------------------------------------------------------------------

HOLDER = ("import sys, time\nfrom stratos_lite.storage.lock import OutDirLock\n"
          "held = OutDirLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")


def test_fault_second_run_in_a_held_out_dir_is_refused_and_a_dead_runs_lock_taken_over(demo_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    model, dataset, tok = build(str(demo_dir), dropout=0.0)
    with pytest.raises(LockError, match=rf"{tmp_path} is in use by another run: process {holder.pid} on "):
        Trainer(model, dataset, quick_config(tmp_path, max_steps=2), pad_id=tok.pad_id).train()
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything was written
    holder.kill()  # SIGKILL: its lock file stays, naming it, but the kernel released the lock
    holder.wait()
    with pytest.warns(StaleLockWarning, match=rf"lock left by process {holder.pid} on .* no longer running"):
        Trainer(model, dataset, quick_config(tmp_path, max_steps=2), pad_id=tok.pad_id).train()
    assert (tmp_path / ".lock").read_text() == ""  # a clean end leaves no owner behind


# -- a changed recipe ---------------------------------------------------------------------------------------

def train_to(out_dir, demo_dir, dataset=None, **overrides):
    model, built, tok = build(str(demo_dir), dropout=0.0)
    config = quick_config(out_dir, **{"max_steps": 4, "save_every": 2, **overrides})
    return Trainer(model, dataset or built, config, pad_id=tok.pad_id).train()


def test_fault_resuming_with_a_changed_recipe_lists_each_change(demo_dir, tmp_path):
    train_to(tmp_path, demo_dir)
    with pytest.raises(ConfigError, match=r"checkpoint-000004: the recipe changed since this checkpoint: lr: 0\.001 "
                                          r"-> 0\.002; max_steps: 4 -> 6\. .* allow_recipe_change = true"):
        train_to(tmp_path, demo_dir, lr=2e-3, max_steps=6)
    # What does not change the math may change freely (the run is complete: it only writes its outputs).
    train_to(tmp_path, demo_dir, save_every=1, keep_checkpoints=7, progress=True, heap_release="steps")
    tokenizer = sl.Tokenizer.from_pretrained(demo_dir / "tokenizer")
    lines = (demo_dir / "train.jsonl").read_text().splitlines()
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ConfigError, match=rf"train_data examples: {len(lines)} -> {len(lines) - 1}; train_data "
                                          r"content \(SHA-256\): '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        train_to(tmp_path, demo_dir, dataset=ScoredDataset.from_jsonl(changed, tokenizer, max_len=256))
    # An explicit override continues, printing and recording each change.
    train_to(tmp_path, demo_dir, max_steps=6, allow_recipe_change=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["recipe_changes"] == ["max_steps: 4 -> 6"] and "recipe_changes" not in records[5]


# -- atomic outputs -----------------------------------------------------------------------------------------

def test_fault_kill_while_writing_outputs_leaves_the_previous_ones(demo_dir, tmp_path, monkeypatch):
    model, _, tok = build(str(demo_dir), dropout=0.0)
    adapter = sl.save_adapter(model, tmp_path / "adapter")
    merged = sl.save_pretrained(model.__class__(model.config), tok, tmp_path / "merged")
    before = {p: p.read_bytes() for folder in (adapter, merged) for p in folder.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(peft_module, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        sl.save_adapter(model, adapter)
    monkeypatch.setattr(folders_module, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        sl.save_pretrained(model.__class__(model.config), tok, merged)
    assert {p: p.read_bytes() for folder in (adapter, merged) for p in folder.iterdir()} == before
    report = tmp_path / "eval_report.md"
    report.write_text("the previous report\n")
    with pytest.raises(KeyboardInterrupt), staged_file(report) as staging:  # how every report file is written
        staging.write_text("half a rep")
        raise KeyboardInterrupt
    assert report.read_text() == "the previous report\n" and hidden_leftovers(tmp_path) == []


# -- data values --------------------------------------------------------------------------------------------

RECORD = {"profile_id": "geo", "profile": "Geophysicist, Kuwait.", "article_id": "a1", "title": "Oil output rises",
          "article": "Kuwait oil output rose.", "score": 7.5, "reasoning": "Same country."}


@pytest.mark.parametrize(("change", "message"), [
    ({"score": 11}, "score 11 is outside 0-10"),
    ({"score": -0.5}, r"score -0\.5 is outside 0-10"),
    ({"score": float("nan")}, "score must be a number, got nan"),
    ({"score": float("inf")}, "score must be a number, got inf"),
    ({"weight": 0}, "weight must be a positive finite number, got 0"),
    ({"weight": -2.0}, r"weight must be a positive finite number, got -2\.0"),
    ({"weight": float("nan")}, "weight must be a positive finite number, got nan"),
    ({"weight": float("inf")}, "weight must be a positive finite number, got inf"),
    ({"weight": "2"}, "weight must be a positive finite number, got '2'"),
    ({"weight": True}, "weight must be a positive finite number, got True"),
])
def test_fault_data_values_out_of_range_name_file_and_line(tmp_path, tokenizer, change, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, **change}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: {message}"):
        ScoredDataset.from_jsonl(path, tokenizer, max_len=512)


def test_fault_scores_outside_custom_bands_and_bad_band_weights(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "score": 9.0}) + "\n")
    bands = [Band("low", 0.0, 5.0, 1.0, 0.5), Band("mid", 5.0, 8.0, 2.0, 0.5)]
    with pytest.raises(DataError, match=rf"{path}:2: score 9\.0 falls in no band \(0\.0\.\.8\.0\)"):
        ScoredDataset.from_jsonl(path, tokenizer, max_len=512, bands=bands)
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"band 'mid': weight {weight} must be a positive finite number"):
            Band("mid", 5.0, 8.0, weight, 0.5)
    # A line's own positive weight replaces its band's.
    path.write_text(json.dumps({**RECORD, "weight": 4.5}) + "\n" + json.dumps(RECORD) + "\n")
    assert [e.weight for e in ScoredDataset.from_jsonl(path, tokenizer, max_len=512).examples] == [4.5, 2.0]
