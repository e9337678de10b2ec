"""Tiny random Qwen3 checkpoints written by transformers (the oracle), a tiny ChatML tokenizer, and Qwen3's
real tokenizer files (vendored)."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest
import torch

from stratos_lite import Tokenizer, train_chatml_tokenizer
from stratos_lite.demo.data import make_demo_data


def share_the_cores() -> None:
    """Under pytest-xdist, each worker's torch (and through OMP_NUM_THREADS each process it starts) gets its share
    of the cores. With a thread per core in every worker, two workers on two cores run four threads that spin
    while they wait for one another: the suite took 1.6 times as long (benchmarks/RESULTS.md)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


share_the_cores()

CORPUS = [
    "Senior geophysicist at KOC Kuwait follows seismic surveys, reservoir models and oil price news.",
    "An indie game developer in Berlin reads about Gamescom, Steam releases and publishing deals.",
    "Marine electrician on offshore wind farms near Stavanger: turbines, cables, safety, weather.",
    "Score 0-10 with reasoning: the article covers regional energy policy and its effect on jobs.",
    '{"score": 7.5} {"score": 0.0} think about relevance, region, field and topic overlap 0123456789',
] * 4


def tiny_config(**overrides) -> dict:
    config = dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
        tie_word_embeddings=False, hidden_act="silu", attention_bias=False, bos_token_id=None,
        eos_token_id=2,
    )
    config.update(overrides)
    return config


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights with enough spread that every part of the network (norm weights included) matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    return model


def hf_model(config: dict, seed: int = 0):
    import transformers

    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.items() if k != "architectures"})
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(hf_config).float().eval()
    return randomize_(model, seed)


def write_hf_checkpoint(folder, config: dict, seed: int = 0, dtype=torch.float32, shard_size="2GB"):
    """Save a random transformers Qwen3 to `folder`; returns the transformers model (fp32, eval)."""
    model = hf_model(config, seed)
    model.to(dtype).save_pretrained(folder, max_shard_size=shard_size)
    return model.float()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small demo data set (train/eval JSONL and its tokenizer) for training runs."""
    folder = tmp_path_factory.mktemp("demo")
    make_demo_data(folder, train_articles=24, eval_articles=4, vocab_size=600)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return train_chatml_tokenizer(CORPUS, vocab_size=400)


pytest_plugins = ["pytester"]  # test_isolation runs a crashing suite in a subprocess and reads its summary

QWEN3_FILES = {  # vendored, with their licence, in tests/data/qwen3 (see NOTICE.md there)
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizer_config.json": "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
}


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory):
    """A folder holding Qwen3's real tokenizer.json and tokenizer_config.json, unpacked and checked."""
    folder = tmp_path_factory.mktemp("qwen3-tokenizer")
    for name, digest in QWEN3_FILES.items():
        data = gzip.decompress((Path(__file__).parent / "data" / "qwen3" / f"{name}.gz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == digest, f"tests/data/qwen3/{name}.gz is not the vendored file"
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_tokenizer_dir):
    return Tokenizer.from_pretrained(qwen3_tokenizer_dir)
