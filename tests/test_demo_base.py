"""The demo's shipped base (stratos_lite/demo/shipped_base/): made by the script from today's code and settings, and
as good at reading profiles as its record says.

tools/make_demo_base.py takes 12 minutes on 2 cores, too long for the suite, so the test repeats what decides
what it makes: the data and tokenizer (byte for byte), the model's initial weights and the base phase's
first steps, with the full run's schedule, whose losses must be the recorded ones. A change to the data,
tokenizer, model, sampler or loop shows there; the held-out reading of the shipped weights is checked
directly.
"""

import json

import pytest
import torch

from stratos_lite.data.records import read_jsonl
from stratos_lite.demo.base import (
    VENDORED_BASE,
    base_settings,
    load_vendored_base,
    reading_quality,
    step_losses,
    train_base,
    vendored_record,
    warmup_steps,
)
from stratos_lite.demo.config import DemoConfig
from stratos_lite.demo.data import make_demo_data
from stratos_lite.evaluation.engines import TorchEngine
from stratos_lite.evaluation.predictions import predict
from stratos_lite.model.tokenizer import Tokenizer
from stratos_lite.train.trainer import Trainer

REPEATED = 40  # of the recorded warmup steps, the first this many are trained again


@pytest.fixture(scope="module")
def record():
    return vendored_record()


def config_of(record: dict, out_dir) -> DemoConfig:
    settings = record["settings"]
    return DemoConfig(out_dir=str(out_dir), seed=settings["seed"], data=dict(settings["data"]),
                      model=dict(settings["model"]), base=dict(settings["base"]))


def test_shipped_base_was_made_with_the_demos_settings(record):
    assert record["settings"] == base_settings(DemoConfig()), (
        "demo.toml's seed, [data], [model] or [base] changed since the shipped base was made: "
        "run python tools/make_demo_base.py")
    assert record["dtype"] == "float32" and record["steps"] == DemoConfig().base["max_steps"]


def test_script_repeats_the_shipped_data_tokenizer_and_first_steps(record, tmp_path, monkeypatch):
    config = config_of(record, tmp_path)
    paths = make_demo_data(tmp_path / "data", seed=config.seed, **config.data)
    assert (paths["tokenizer"] / "tokenizer.json").read_bytes() == (VENDORED_BASE / "tokenizer.json").read_bytes()
    tokenizer = Tokenizer.from_pretrained(paths["tokenizer"])
    assert len(record["warmup_losses"]) == warmup_steps(config, record["steps"]) >= REPEATED

    class Enough(Exception):
        """The run as the script makes it (its schedule too), stopped after its first steps."""

    log = Trainer._log

    def log_then_stop(trainer, step_record, bar):
        log(trainer, step_record, bar)
        if step_record["step"] == REPEATED:
            raise Enough

    monkeypatch.setattr(Trainer, "_log", log_then_stop)
    with pytest.raises(Enough):
        train_base(config, paths, tokenizer, out_dir=str(tmp_path / "base"), dtype="float32", progress=False)
    losses = step_losses(tmp_path / "base")
    # Bitwise on the CPU that made it; another CPU's float32 kernels round differently and the steps carry
    # that on, by far less than any change to what the steps compute moves them.
    assert losses == pytest.approx(record["warmup_losses"][:REPEATED], abs=0.02)
    assert losses[-1] < 0.5 * losses[0]  # it learns: the record is not of a run that stood still


def test_shipped_base_reads_profiles_of_articles_it_never_saw(record, tmp_path):
    model, tokenizer = load_vendored_base(DemoConfig())
    paths = make_demo_data(tmp_path / "data", train_articles=1, eval_articles=24, profiles_per_article=5,
                           seed=1234, tokenizer=tokenizer)  # a seed no base or demo run used
    quality = reading_quality(model, tokenizer, paths["eval"])
    # The base's answers need not parse every time (it rambles on the odd article; 6 of 300 when made): the
    # DoRA phase settles the answer. What it must do is read each profile's values right.
    assert quality["parse_failures"] <= 0.05 * quality["records"]
    for kind, errors in quality["verdict_errors"].items():
        assert errors <= 0.05 * quality["records"], f"{kind}: {errors} of {quality['records']} verdicts wrong"
    made = record["held_out"]
    assert max(made["verdict_errors"].values()) <= 0.02 * made["records"]


def test_shipped_base_is_profile_blind(tmp_path):
    """What the adapters fix: its answer is the article's, whoever reads it."""
    model, tokenizer = load_vendored_base(DemoConfig())
    paths = make_demo_data(tmp_path / "data", train_articles=1, eval_articles=12, profiles_per_article=5,
                           seed=4321, tokenizer=tokenizer)
    records = [parsed for _, parsed in read_jsonl(paths["eval"])[0]]
    predictions, _ = predict(TorchEngine(model, tokenizer.pad_id, batch_size=64), tokenizer, records,
                             max_new_tokens=96, progress=False)
    by_article: dict[str, list[tuple[float, float]]] = {}
    for record, prediction in zip(records, predictions, strict=True):
        if prediction.predicted is not None:
            by_article.setdefault(record.article_id, []).append((record.score, prediction.predicted))
    truth_spread = [max(t for t, _ in pairs) - min(t for t, _ in pairs) for pairs in by_article.values()]
    answer_spread = [max(p for _, p in pairs) - min(p for _, p in pairs) for pairs in by_article.values()]
    assert sum(truth_spread) / len(truth_spread) >= 2.0  # the readers' true scores differ...
    assert sum(answer_spread) / len(answer_spread) <= 1.0  # ...and the base answers alike


@pytest.mark.parametrize(("section", "key", "value"), [("model", "hidden_size", 128), ("base", "lr", 1e-3),
                                                       ("data", "vocab_size", 1024)])
def test_demo_refuses_settings_the_shipped_base_was_not_made_with(section, key, value):
    config = DemoConfig()
    getattr(config, section)[key] = value
    with pytest.raises(ValueError, match=rf"\[{section}\] {key} = .* vendored_base = false"):
        load_vendored_base(config)


def test_shipped_weights_are_bf16_and_loadable_as_float32():
    model, _ = load_vendored_base(DemoConfig())
    header = json.loads((VENDORED_BASE / "config.json").read_text())
    assert header["torch_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_demo_dora_phase_on_the_shipped_base_repeats_bitwise_for_a_seed(tmp_path):
    """What a demo run computes after its (tested) data: the same seed gives the same adapter, bit for bit."""
    from stratos_lite.data.dataset import ScoredDataset
    from stratos_lite.demo.config import phase_config
    from stratos_lite.model.dora import apply_dora

    adapters = []
    for run in ("a", "b"):
        config = DemoConfig(out_dir=str(tmp_path / run), seed=3)
        model, tokenizer = load_vendored_base(config)
        paths = make_demo_data(tmp_path / run / "data", train_articles=8, eval_articles=1, seed=3, tokenizer=tokenizer)
        dora = phase_config(config, "dora", max_steps=3, batch_size=2, grad_accum=2, verify_batches=10,
                            save_every=3, progress=False)
        apply_dora(model, dora.rank, dora.alpha, dora.dropout, dora.targets, seed=dora.seed)
        Trainer(model, ScoredDataset.from_jsonl(paths["train"], tokenizer, max_len=dora.max_len), dora,
                pad_id=tokenizer.pad_id).train()
        adapters.append((tmp_path / run / "dora" / "adapter" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]
