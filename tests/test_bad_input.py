"""Bad configs, model folders, adapters, tokenizers and checkpoints are named with what is wrong; a damaged
newest checkpoint is skipped for the newest intact one; one seed makes a run repeat bit for bit."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint
from safetensors.torch import load_file
from train_child import build, save_base

import stratos_lite as sl
from stratos_lite.config import ConfigError, TrainConfig
from stratos_lite.storage.files import CheckpointError, FileFormatError
from stratos_lite.train.checkpoint import CheckpointWarning, checkpoints
from stratos_lite.train.trainer import Trainer

TOOLS = Path(__file__).parent.parent / "tools"


# -- settings ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "value", "allowed"), [
    ("lr", '"fast"', "a number, > 0 and finite"),
    ("batch_size", "0", "an integer, >= 1"),
    ("grad_accum", "-2", "an integer, >= 1"),
    ("dropout", "1.5", r"a number, in \[0, 1\)"),
    ("warmup_ratio", "-0.1", r"a number, in \[0, 1\]"),
    ("max_steps", "2.5", "an integer, >= 0"),
    ("gradient_checkpointing", '"yes"', "true or false"),
    ("targets", '["q_proj", 3]', "a list of non-empty strings, not empty"),
    ("adam_betas", "[0.9]", r"a list of numbers, two values in \[0, 1\)"),
    ("dtype", '"fp16"', "a string, one of 'bfloat16', 'float32', 'auto'"),
])
def test_bad_settings_are_refused_from_toml_set_and_python(tmp_path, setting, value, allowed):
    shown = re.escape(repr(tomllib.loads(f"v = {value}")["v"]))
    message = rf"setting '{setting}' = {shown}: expected {allowed}$"
    path = tmp_path / "run.toml"
    path.write_text(f"{setting} = {value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        TrainConfig.from_toml(path)
    (tmp_path / "good.toml").write_text("lr = 1e-5\n")
    with pytest.raises(ConfigError, match=rf"^--set: {message}"):
        TrainConfig.from_toml(tmp_path / "good.toml", [f"{setting}={value}"])
    with pytest.raises(ConfigError, match=rf"^{message}"):
        TrainConfig(**{setting: tomllib.loads(f"v = {value}")["v"]})


def test_unquoted_word_given_with_set_is_a_string_and_refused():
    with pytest.raises(ConfigError, match=r"^--set: setting 'lr' = 'fast': expected a number"):
        TrainConfig.from_dict({}, overrides=["lr=fast"])


def test_integer_for_a_float_setting_is_that_float():
    assert TrainConfig(lr=1, epochs=2).lr == 1.0 and isinstance(TrainConfig(epochs=2).epochs, float)


def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('lr = 1e-5\nbatch_size = = 2\n')
    with pytest.raises(FileFormatError, match=rf"^{path}: not valid TOML: .*line 2"):
        TrainConfig.from_toml(path)
    result = subprocess.run([sys.executable, str(TOOLS / "train.py"), "--config", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {path}: not valid TOML")
    assert "Traceback" not in result.stderr  # bad input is a message for the user, not a crash


# -- files a model folder is made of ----------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path, tokenizer):
    write_hf_checkpoint(tmp_path / "model", tiny_config(vocab_size=512))
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_config_json_that_is_not_json(model_dir):
    (model_dir / "config.json").write_text('{"model_type": "qwen3", hidden_size: 64}')
    with pytest.raises(FileFormatError, match=rf"^{model_dir / 'config.json'}: not valid JSON: Expecting property"):
        sl.load_model(model_dir)
    (model_dir / "config.json").write_text('["qwen3"]')
    with pytest.raises(FileFormatError, match=rf"^{model_dir / 'config.json'}: not a JSON object but a list"):
        sl.load_model(model_dir)


@pytest.mark.parametrize(("keep", "why"), [(4, "shorter than its length prefix"), (40, "the header claims"),
                                           (-100, "truncated: its tensors need")])
def test_truncated_safetensors_in_a_model_folder(model_dir, keep, why):
    shard = model_dir / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    with pytest.raises(FileFormatError, match=rf"^{shard}: .*{why}"):
        sl.load_model(model_dir)


def test_tokenizer_files_that_do_not_parse(model_dir):
    config = model_dir / "tokenizer_config.json"
    config.write_text("{not json")
    with pytest.raises(FileFormatError, match=rf"^{config}: not valid JSON"):
        sl.Tokenizer.from_pretrained(model_dir)
    config.write_text("{}")
    (model_dir / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(FileFormatError, match=rf"^{model_dir / 'tokenizer.json'}: not a tokenizer the tokenizers"):
        sl.Tokenizer.from_pretrained(model_dir)


def test_adapter_files_that_do_not_parse(model_dir, tmp_path):
    model = sl.load_model(model_dir, dtype=torch.float32)
    sl.apply_dora(model, rank=2, alpha=4)
    adapter = sl.save_adapter(model, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    fresh = sl.load_model(model_dir, dtype=torch.float32)
    with pytest.raises(FileFormatError, match=rf"^{weights}: truncated"):
        sl.load_adapter(fresh, adapter)
    (adapter / "adapter_config.json").write_text('{"r": 2,')
    with pytest.raises(FileFormatError, match=rf"^{adapter / 'adapter_config.json'}: not valid JSON"):
        sl.load_adapter(fresh, adapter)


# -- checkpoints -------------------------------------------------------------------------------------------

def run_config(out_dir, **overrides) -> TrainConfig:
    values = dict(out_dir=str(out_dir), batch_size=2, grad_accum=2, lr=1e-3, max_steps=6, save_every=2,
                  keep_checkpoints=3, dtype="float32", verify_batches=0, progress=False,
                  gradient_checkpointing=False)
    return TrainConfig(**{**values, **overrides})


def train(demo_dir, out_dir, **overrides):
    model, dataset, tok = build(str(demo_dir), dropout=0.1)
    return Trainer(model, dataset, run_config(out_dir, **overrides), pad_id=tok.pad_id).train()


def logged_losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(out_dir) -> dict:
    return load_file(str(Path(out_dir) / "adapter" / "adapter_model.safetensors"))


def test_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(demo_dir, tmp_path):
    train(demo_dir, tmp_path / "straight")
    run = tmp_path / "run"
    train(demo_dir, run)  # checkpoints 2, 4, 6
    shutil.rmtree(run / "adapter")
    newest = run / "checkpoint-000006" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:-64])  # truncated on disk after it was written
    with pytest.warns(CheckpointWarning, match=r"skipping damaged checkpoint .*checkpoint-000006: "
                                               r"trainable\.safetensors holds \d+ bytes, \d+ were written"):
        train(demo_dir, run)  # resumes from step 4 and redoes 5 and 6
    assert logged_losses(run) == logged_losses(tmp_path / "straight")
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(run)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [p.name for p in checkpoints(run)] == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006"]


def test_changed_bytes_are_caught_by_the_checksum(demo_dir, tmp_path):
    train(demo_dir, tmp_path, max_steps=4)
    optimizer = tmp_path / "checkpoint-000004" / "optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    optimizer.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match="optimizer.safetensors does not match the SHA-256"):
        train(demo_dir, tmp_path, max_steps=4)


def test_no_intact_checkpoint_stops_and_deletes_nothing(demo_dir, tmp_path):
    train(demo_dir, tmp_path, max_steps=4)
    (tmp_path / "checkpoint-000002" / "state.json").unlink()
    (tmp_path / "checkpoint-000004" / "manifest.json").write_text("{")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with (pytest.warns(CheckpointWarning),
          pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from \(checkpoint-000004: "
                                               r"manifest\.json is unreadable .*; checkpoint-000002: state\.json is "
                                               r"missing\)\. Nothing was deleted")):
        train(demo_dir, tmp_path, max_steps=6)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# -- one seed ----------------------------------------------------------------------------------------------

def test_apply_dora_initialisation_follows_its_seed():
    def adapters(seed, draw_first):
        torch.manual_seed(draw_first)  # whatever the global generator did before must not matter
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config.from_dict(tiny_config()))
        sl.apply_dora(model, rank=2, alpha=4, seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, again, other = adapters(7, 0), adapters(7, 1), adapters(8, 0)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_same_config_twice_gives_bitwise_identical_runs(demo_dir, tmp_path):
    save_base(str(demo_dir), tmp_path / "base")
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{tmp_path / "base"}"\ntrain_data = "{demo_dir / "train.jsonl"}"\nrank = 2\n'
                      'alpha = 4\ndropout = 0.1\nmax_len = 256\nmax_steps = 4\nbatch_size = 2\ngrad_accum = 2\n'
                      'lr = 1e-3\nverify_batches = 0\nprogress = false\n')

    def run(name, *extra):
        subprocess.run([sys.executable, str(TOOLS / "train.py"), "--config", str(config), "--set",
                        f'out_dir="{tmp_path / name}"', *extra], check=True, capture_output=True)
        return logged_losses(tmp_path / name), adapter_tensors(tmp_path / name)

    (losses_a, adapter_a), (losses_b, adapter_b) = run("a"), run("b")
    assert losses_a == losses_b
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    losses_c, adapter_c = run("c", "--set", "seed=1")
    assert losses_c != losses_a and not torch.equal(adapter_c[next(iter(adapter_a))], adapter_a[next(iter(adapter_a))])
