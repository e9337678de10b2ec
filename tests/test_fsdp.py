"""FSDP2 under torchrun with 2 gloo ranks: the same run as one process, resumable after SIGKILL, and its
checkpoints resumable on another number of ranks."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_child import save_base

from stratos_lite.train.checkpoint import checkpoints

HERE = Path(__file__).parent


def free_port() -> int:
    """A port nobody listens on now (fixed ports collided when runs followed each other closely)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_process(data_dir, out_dir, *extra, slow=False):
    command = [sys.executable, str(HERE / "train_child.py"), str(data_dir), str(out_dir), "--batch-size", "4",
               "--dropout", "0", *extra, *(["--slow"] if slow else [])]
    return subprocess.run(command, check=True, capture_output=True)


def two_ranks(data_dir, out_dir, *extra, slow=False) -> list[str]:
    """The command for the same global batch (2 ranks x 2) sharded with FSDP."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), str(HERE / "train_child.py"), str(data_dir), str(out_dir), "--batch-size", "2",
            "--dropout", "0", "--strategy", "fsdp", *extra, *(["--slow"] if slow else [])]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_ranks(command: list[str]) -> None:
    """Run a torchrun command; a failure shows what the ranks printed."""
    result = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def final_tensors(out_dir, mode: str) -> dict[str, torch.Tensor]:
    """The run's final output: the PEFT adapter (DoRA) or the HF folder's weights (full fine-tuning)."""
    path = Path(out_dir) / ("adapter/adapter_model.safetensors" if mode == "dora" else "model/model.safetensors")
    return load_file(str(path))


def assert_close(expected: dict, actual: dict, rtol: float = 1e-4) -> None:
    """Each tensor within rtol of its largest value. Not bitwise: two ranks sum gradients in another order,
    and AdamW's division by sqrt(v) magnifies that fp32 rounding where a gradient is near zero (measured up
    to 1.1e-5 after 5 steps on the demo's data); a wrong shard or a missed reduction is off by far more."""
    assert expected.keys() == actual.keys()
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-12)
        assert (expected[name] - actual[name]).abs().max() / scale <= rtol, name


@pytest.mark.parametrize(("mode", "extra"), [("dora", []), ("full", ["--loss-chunk", "7"]),
                                            ("dora", ["--cpu-offload", "--loss-chunk", "7"])],
                         ids=["dora", "full-chunked-loss", "dora-offload-chunked-loss"])
def test_fsdp_two_ranks_match_one_process(demo_dir, tmp_path, mode, extra):
    """The FSDP runs with the loss over the vocabulary in chunks of 7 positions against one process with it all
    at once (the default's, at these few positions) give the same run too."""
    one_process(demo_dir, tmp_path / "one", "--steps", "5", "--mode", mode)
    run_ranks(two_ranks(demo_dir, tmp_path / "fsdp", "--steps", "5", "--mode", mode, *extra))
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert_close(final_tensors(tmp_path / "one", mode), final_tensors(tmp_path / "fsdp", mode))
    # Checkpoints hold whole tensors whatever the world size: the same names and shapes as one process's.
    one = load_file(str(tmp_path / "one" / "checkpoint-000004" / "trainable.safetensors"))
    sharded = load_file(str(tmp_path / "fsdp" / "checkpoint-000004" / "trainable.safetensors"))
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in sharded.items()}


def worker_pids(launcher: int) -> list[int]:
    """The processes torchrun started (its children)."""
    return [int(pid) for pid in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()]


@pytest.mark.parametrize("extra", [[], ["--strategy", "ddp", "--dropout", "0.1"]], ids=["fsdp", "ddp-dropout"])
def test_fsdp_resume_after_sigkill_continues_identically(demo_dir, tmp_path, extra):
    """With dropout, each rank draws its own masks: a checkpoint keeps every rank's generators, and each rank
    resumes its own."""
    run_ranks(two_ranks(demo_dir, tmp_path / "straight", *extra))
    interrupted = tmp_path / "interrupted"
    launcher = subprocess.Popen(two_ranks(demo_dir, interrupted, *extra, slow=True), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (interrupted / "checkpoint-000004").exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in worker_pids(launcher.pid):  # the ranks die as an out-of-memory kill would take them
        os.kill(pid, signal.SIGKILL)
    launcher.wait(timeout=60)
    assert [p.name for p in checkpoints(interrupted)][-1] == "checkpoint-000004"
    assert not (interrupted / "adapter").exists()
    run_ranks(two_ranks(demo_dir, interrupted, *extra))
    assert losses(interrupted) == losses(tmp_path / "straight")
    straight, resumed = final_tensors(tmp_path / "straight", "dora"), final_tensors(interrupted, "dora")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_two_rank_checkpoint_resumes_on_one_rank(demo_dir, tmp_path):
    run_ranks(two_ranks(demo_dir, tmp_path / "fsdp", "--steps", "6"))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoint-000006")
    shutil.rmtree(resumed / "adapter")
    one_process(demo_dir, resumed, "--steps", "6")  # one process, batch 4: the same global batch
    assert losses(resumed)[:4] == losses(tmp_path / "fsdp")[:4]  # restored from the checkpoint as written
    assert losses(resumed)[4:] == pytest.approx(losses(tmp_path / "fsdp")[4:], rel=1e-5)  # steps 5-6 redone
    assert_close(final_tensors(tmp_path / "fsdp", "dora"), final_tensors(resumed, "dora"))


def test_train_tool_loads_each_rank_its_shards_and_matches_one_process(demo_dir, tmp_path):
    """tools/train.py under torchrun with strategy fsdp builds the model on the meta device, shards it, then
    reads the weights row block by row block (the builder's prepare_model): the same run as one process."""
    save_base(str(demo_dir), tmp_path / "base")
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{tmp_path / "base"}"\ntrain_data = "{demo_dir / "train.jsonl"}"\nrank = 4\n'
                      'alpha = 8\ndropout = 0.0\nmax_len = 256\nmax_steps = 4\ngrad_accum = 2\nlr = 1e-3\n'
                      'dtype = "float32"\nverify_batches = 0\nprogress = false\n')
    tool = str(HERE.parent / "tools" / "train.py")
    subprocess.run([sys.executable, tool, "--config", str(config), "--set", f'out_dir="{tmp_path / "one"}"',
                    "--set", "batch_size=4"], check=True, capture_output=True)
    run_ranks([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), tool, "--config", str(config), "--set", f'out_dir="{tmp_path / "fsdp"}"',
               "--set", "batch_size=2", "--set", "strategy=fsdp"])
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert_close(final_tensors(tmp_path / "one", "dora"), final_tensors(tmp_path / "fsdp", "dora"))


def test_nan_guard_stops_every_rank_with_its_diagnosis(demo_dir, tmp_path):
    """A non-finite step stops both ranks (no rank left waiting in a collective), names the module, and
    keeps the last finite adapter."""
    result = subprocess.run(two_ranks(demo_dir, tmp_path, "--nan"), env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    diagnosis = (tmp_path / "nonfinite_diagnosis.txt").read_text()
    assert "step 1" in diagnosis and "first module whose output went non-finite: model.layers.1.mlp" in diagnosis
    adapter = final_tensors(tmp_path, "dora")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
