"""The demo pipeline end to end at a tiny size: every output exists and parses. It runs in a child process
because the demo evaluates its GGUF files in llama.cpp (tests/isolation.py)."""

import json

import gguf
from isolation import call_in_child

from stratos_lite.demo.config import DemoConfig
from stratos_lite.demo.run import run_demo
from stratos_lite.export.imatrix_file import ImportanceMatrix


def test_demo_pipeline_tiny(tmp_path, capfd):
    """The default path at a tiny size: the shipped base, a few DoRA steps on a few articles."""
    config = DemoConfig(
        out_dir=str(tmp_path / "demo"),
        data={**DemoConfig().data, "train_articles": 16, "eval_articles": 3, "profiles_per_article": 3},
        dora={"rank": 4, "alpha": 8, "dropout": 0.05, "lr": 3e-3, "max_steps": 4, "batch_size": 2, "grad_accum": 2,
              "max_len": 384, "save_every": 2, "verify_batches": 50},
        eval={"batch_size": 16, "max_new_tokens": 12, "spread_articles": 2},
        export={"quants": ["q8_0", "q3_k_m"], "imatrix_records": 20},
    )
    summary = call_in_child(run_demo, config)
    out = tmp_path / "demo"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["examples"] == 9 and "baseline" in metrics
    assert (out / "eval" / "eval_report.md").read_text().startswith("# Evaluation report")
    assert json.loads((out / "eval_before" / "metrics.json").read_text())["examples"] == 9
    layers = config.model["num_hidden_layers"]
    # Every quant exported and scored, each K-quant also with the training records' importance matrix; the
    # Modelfile serves the chosen one.
    for name in ("q8_0", "q3_k_m", "q3_k_m-imatrix"):
        reader = gguf.GGUFReader(out / f"scorer-{name}.gguf")
        assert len(reader.tensors) == 2 + 11 * layers
        assert ("quantize.imatrix.entries_count" in reader.fields) == name.endswith("imatrix")
        shipped = summary["gguf"][f"scorer-{name}.gguf"]
        assert shipped["examples"] == 9 and shipped["prompt_checks_failed"] == 0  # served prompts, every quant
        assert shipped["kl_divergence"] >= 0
    matrix = ImportanceMatrix.load(out / "imatrix.gguf")
    assert len(matrix.sums) == 7 * layers and matrix.datasets == [str(out / "data" / "train.jsonl")]
    assert matrix.chunk_count == 20
    chosen = summary["chosen_gguf"] or "scorer-q8_0.gguf"
    assert (out / "Modelfile").read_text().startswith(f"FROM ./{chosen}")
    assert json.loads((out / "dora" / "sampler_verification.json").read_text())["batches"] == 50
    assert (out / "dora" / "adapter" / "adapter_config.json").is_file()
    assert (out / "merged" / "config.json").is_file() and (out / "base_model" / "config.json").is_file()
    assert (out / "dora" / "loss_curve.svg").is_file() and (out / "dataset_report.md").is_file()
    assert json.loads((out / "dataset_report.json").read_text())["bands"][0]["name"] == "noise"
    assert json.loads((out / "summary.json").read_text())["paths"]["gguf"] == str(out / chosen)
    assert summary["after"]["examples"] == 9
    shipped = summary["gguf"]["scorer-q8_0.gguf"]
    assert shipped["examples"] == 9 and shipped["prompt_checks_failed"] == 0
    assert (out / "eval" / "predictions_scorer-q8_0.jsonl").is_file()
    printed = capfd.readouterr().out
    assert "adapters off" in printed and "scorer-q3_k_m-imatrix.gguf" in printed and str(out / chosen) in printed
    assert "smallest GGUF within 0.02 Spearman" in printed
