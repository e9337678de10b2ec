"""Score parsing, metrics against hand computation (and scipy), the report, and evaluation end to end."""

import json

import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint
from scipy.stats import spearmanr

import stratos_lite as sl
from stratos_lite.data.task import parse_completion, scoring_completion, tier
from stratos_lite.evaluation.evaluate import evaluate
from stratos_lite.evaluation.metrics import metrics, spread_check
from stratos_lite.evaluation.predictions import Prediction
from stratos_lite.evaluation.report import report_markdown


def completion_text(score, reasoning="Field match."):
    return scoring_completion(score, reasoning).removesuffix("<|im_end|>")


@pytest.mark.parametrize(("text", "score", "think_empty", "status"), [
    (completion_text(7.5), 7.5, False, "ok"),  # what the training data teaches, read back
    ('<think>\n\n</think>\n\n{"score": 3}', 3.0, True, "ok"),  # empty think
    ('{"score": 2.5}', 2.5, True, "ok"),  # missing think
    ('<think>x</think>\n{"score": 11}', None, False, "score 11 is outside 0-10"),
    ('<think>x</think>\n{"score": -0.5}', None, False, "score -0.5 is outside 0-10"),
    ('<think>x</think>\n{"score": 4} and then some words', 4.0, False, "ok"),  # trailing text
    ('<think>x</think>\n{"score": "high"}', None, False, "score is not a number: 'high'"),
    ("the quick brown fox", None, True, "no JSON object with a score"),
    ('<think>x</think>{"score": 4', None, False, "unreadable JSON"),
])
def test_parse_completion(text, score, think_empty, status):
    parsed = parse_completion(text)
    assert (parsed.score, parsed.think_empty, parsed.status) == (score, think_empty, status)


def test_tiers_follow_the_report():
    assert [tier(r) for r in (0.879, 0.8, 0.75, 0.7, 0.69, 0.65, 0.6, 0.5, 0.416)] == [
        "Excellent", "Strong", "Strong", "Strong", "Good", "Moderate", "Moderate", "Weak", "Weak"]


def pred(i, profile, article, truth, predicted, think_empty=False):
    status = "ok" if predicted is not None else "no JSON object with a score"
    return Prediction(i, profile, article, f"title {article}", truth, predicted, 0 if think_empty else 5, status,
                      think_empty, "")


PREDICTIONS = [
    pred(0, "p1", "a1", 8.5, 8.0), pred(1, "p2", "a1", 1.0, 1.0), pred(2, "p3", "a1", 0.0, 0.5),
    pred(3, "p1", "a2", 0.0, 0.0), pred(4, "p2", "a2", 6.0, 4.0, think_empty=True),
    pred(5, "p1", "a3", 2.0, None), pred(6, "p3", "a4", 5.0, 7.0),
]


def test_metrics_equal_hand_computation():
    m = metrics(PREDICTIONS, threshold=5.0)
    truth = [8.5, 1.0, 0.0, 0.0, 6.0, 5.0]
    got = [8.0, 1.0, 0.5, 0.0, 4.0, 7.0]
    assert m["examples"] == 7 and m["parsed"] == 6 and m["parse_failures"] == 1
    # same side of 5.0: yes, yes, yes, yes, no (6 vs 4), yes (5 vs 7) -> 5/6
    assert m["direction_accuracy"] == pytest.approx(5 / 6)
    assert m["mae"] == pytest.approx((0.5 + 0 + 0.5 + 0 + 2 + 2) / 6)
    assert m["spearman"] == pytest.approx(spearmanr(truth, got).statistic)
    assert m["think_empty_rate"] == pytest.approx(1 / 7)
    assert m["per_profile"]["p1"]["n"] == 2  # p1's a3 failed to parse
    assert m["per_profile"]["p1"]["spearman"] == pytest.approx(1.0)
    # multi-profile articles: a1 (spread 7.5 >= 2) and a2 (spread 4 >= 2); a3, a4 have one profile each
    assert m["psr_articles"] == 2 and m["psr"] == 1.0


def test_psr_and_spread_on_a_multi_profile_set():
    rows = [pred(0, "p1", "a", 9, 5.0), pred(1, "p2", "a", 0, 4.0), pred(2, "p3", "a", 1, 4.5),
            pred(3, "p1", "b", 2, 2.0), pred(4, "p2", "b", 8, 8.0)]
    m = metrics(rows)
    assert m["psr_articles"] == 2 and m["psr"] == 0.5  # a: predicted spread 1.0; b: 6.0
    flat = [pred(r.id, r.profile, r.article, r.truth, 3.0) for r in rows]
    spreads = spread_check(rows, {"flat": flat}, articles=5)
    assert [s["article"] for s in spreads] == ["a", "b"]  # largest truth spread first
    assert spreads[0]["truth_spread"] == 9 and spreads[0]["model_spread"] == 1.0 and spreads[0]["flat_spread"] == 0
    text = report_markdown(m, spreads, baseline=metrics(flat), labels=("flat", "model"))
    assert "| Spearman rho |" in text and "Profile-awareness check" in text and "Worked example" in text


def test_evaluation_end_to_end_writes_files_and_compares_adapters(tmp_path, tokenizer):
    write_hf_checkpoint(tmp_path / "hf", tiny_config(vocab_size=tokenizer.vocab_size))
    model = sl.load_model(tmp_path / "hf", dtype=torch.float32)
    sl.apply_dora(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero adapter that changes what the model says
    rows = [{"profile_id": f"p{k % 3}", "profile": f"Profile {k % 3}", "article_id": f"a{k // 3}",
             "title": f"Kuwait oil {k // 3}", "article": "Oil output rose.", "score": float(k), "reasoning": "x"}
            for k in range(6)]
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate(model, tokenizer, eval_path, tmp_path / "out", batch_size=4, max_new_tokens=6, progress=False)
    out = tmp_path / "out"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and {"id", "profile", "article", "truth", "predicted", "think_length", "status",
                                      "raw"} <= predictions[0].keys()
    assert json.loads((out / "metrics.json").read_text())["examples"] == 6 == result["examples"]
    assert (out / "eval_report.md").read_text().startswith("# Evaluation report")
    off = [json.loads(line) for line in (out / "predictions_adapters_off.jsonl").read_text().splitlines()]
    on = {(p["profile"], p["article"]): p["raw"] for p in predictions}
    assert off and any(on[(p["profile"], p["article"])] != p["raw"] for p in off)


def test_evaluate_and_score_tools(tmp_path, tokenizer):
    import subprocess
    import sys

    write_hf_checkpoint(tmp_path / "hf", tiny_config(vocab_size=tokenizer.vocab_size))
    model = sl.load_model(tmp_path / "hf", dtype=torch.float32)
    sl.save_pretrained(model, tokenizer, tmp_path / "base")
    sl.apply_dora(model, rank=2, alpha=4)
    sl.save_adapter(model, tmp_path / "adapter")
    row = {"profile_id": "p", "profile": "Geophysicist", "article_id": "a", "title": "Oil", "article": "Oil rose.",
           "score": 7.0, "reasoning": "x"}
    (tmp_path / "eval.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(dict(row, profile_id="q")) + "\n")
    common = ["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--dtype", "float32",
              "--max-new-tokens", "4"]
    gguf = sl.export_gguf(model, tokenizer, tmp_path / "shipped.gguf", quant="f32")
    arguments = [*common, "--eval-data", str(tmp_path / "eval.jsonl"), "--out", str(tmp_path / "out"),
                 "--gguf", str(gguf)]
    evaluated = subprocess.run([sys.executable, "tools/evaluate.py", *arguments], check=True, capture_output=True,
                               text=True).stdout  # llama.cpp runs in the tool's own process, not in pytest's
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"predictions.jsonl", "metrics.json", "eval_report.md",
                                                              "predictions_shipped.jsonl", "scatter_shipped.gguf.svg"}
    assert "shipped.gguf: direction accuracy" in evaluated
    assert "shipped.gguf" in json.loads((tmp_path / "out" / "metrics.json").read_text())["engines"]
    printed = subprocess.run([sys.executable, "tools/score.py", *common, "--profile", "Geophysicist", "--title",
                              "Oil", "--article", "Oil rose."], check=True, capture_output=True, text=True).stdout
    assert json.loads(printed.strip().splitlines()[-1])["title"] == "Oil"
