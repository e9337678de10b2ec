"""Generation-based evaluation: parse scores back, metrics of the report's section 6, and its report.

The completion format is the one `data.scoring_completion` writes: a <think> block, then {"score": x}.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from .data import ParsedRecord, read_jsonl
from .dora import adapters_disabled
from .generate import generate

THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
TIERS = ((0.8, "Excellent"), (0.7, "Strong"), (0.65, "Good"), (0.5, "Moderate"), (-math.inf, "Weak"))


@dataclass(frozen=True)
class ParsedScore:
    score: float | None
    think: str
    status: str  # "ok", or why the score could not be read

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def think_empty(self) -> bool:
        return not self.think.strip()


def parse_completion(text: str) -> ParsedScore:
    """Read the think block (missing or blank counts as empty) and the JSON score after it."""
    match = THINK.search(text)
    think = match.group(1) if match else ""
    rest = text[match.end():] if match else text.replace("<think>", "").replace("</think>", "")
    start = rest.find("{")
    if start < 0:
        return ParsedScore(None, think, "no JSON object with a score")
    try:
        value, _ = json.JSONDecoder().raw_decode(rest[start:])  # text after the object is tolerated
    except json.JSONDecodeError:
        return ParsedScore(None, think, "unreadable JSON")
    score = value.get("score") if isinstance(value, dict) else None
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        return ParsedScore(None, think, f"score is not a number: {score!r}")
    if not 0 <= score <= 10:
        return ParsedScore(None, think, f"score {score} is outside 0-10")
    return ParsedScore(float(score), think, "ok")


def tier(rho: float) -> str:
    return next(name for bound, name in TIERS if rho > bound or (bound == 0.7 and rho == 0.7))


@dataclass
class Prediction:
    id: int
    profile: str
    article: str
    title: str
    truth: float
    predicted: float | None
    think_length: int
    status: str
    think_empty: bool
    raw: str


def predict(model, tokenizer, parsed: Sequence[ParsedRecord], batch_size: int = 16, max_new_tokens: int = 160,
            progress: bool = True, desc: str = "evaluate") -> list[Prediction]:
    """Greedy, KV-cached generation for each record (sorted by prompt length to batch with little padding)."""
    prompts = [tokenizer.encode_prompt(p.messages) for p in parsed]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        chunk = order[start:start + batch_size]
        outputs = generate(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                           stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
        texts.update({i: tokenizer.decode(out) for i, out in zip(chunk, outputs, strict=True)})
    predictions = []
    for i, p in enumerate(parsed):
        reading = parse_completion(texts[i])
        predictions.append(Prediction(i, p.profile_id, p.article_id, p.title, p.score,
                                      reading.score, len(reading.think.strip()), reading.status,
                                      reading.think_empty, texts[i]))
    return predictions


def _spread(values: Sequence[float]) -> float:
    return max(values) - min(values) if values else 0.0


def metrics(predictions: Sequence[Prediction], threshold: float = 5.0) -> dict:
    """Direction accuracy, MAE, Spearman (overall and per profile), PSR, think-empty rate, parse failures.
    Parse failures are counted, and left out of the score metrics."""
    good = [p for p in predictions if p.predicted is not None]
    truth = np.array([p.truth for p in good])
    pred = np.array([p.predicted for p in good])
    result = {
        "examples": len(predictions), "parsed": len(good), "parse_failures": len(predictions) - len(good),
        "threshold": threshold,
        "direction_accuracy": float(np.mean((pred >= threshold) == (truth >= threshold))) if good else None,
        "mae": float(np.mean(np.abs(pred - truth))) if good else None,
        "spearman": _spearman(truth, pred),
        "think_empty_rate": float(np.mean([p.think_empty for p in predictions])) if predictions else None,
    }
    by_profile: dict[str, list[Prediction]] = defaultdict(list)
    for p in good:
        by_profile[p.profile].append(p)
    result["per_profile"] = {}
    for profile, rows in sorted(by_profile.items()):
        rho = _spearman(np.array([r.truth for r in rows]), np.array([r.predicted for r in rows]))
        result["per_profile"][profile] = {"n": len(rows), "spearman": rho,
                                          "tier": tier(rho) if rho is not None else "n/a"}
    by_article: dict[str, list[Prediction]] = defaultdict(list)
    for p in good:
        by_article[p.article].append(p)
    multi = [rows for rows in by_article.values() if len({r.profile for r in rows}) >= 2]
    result["psr_articles"] = len(multi)
    result["psr"] = (float(np.mean([_spread([r.predicted for r in rows]) >= 2 for rows in multi]))
                     if multi else None)
    return result


def _spearman(truth: np.ndarray, pred: np.ndarray) -> float | None:
    """Spearman's rho, or None when it is undefined (fewer than two points, or a constant side)."""
    if len(truth) < 2 or np.all(truth == truth[0]) or np.all(pred == pred[0]):
        return None
    return float(spearmanr(truth, pred).statistic)


def spread_check(predictions: Sequence[Prediction], others: dict[str, Sequence[Prediction]],
                 articles: int = 5) -> list[dict]:
    """Profile-awareness: for the multi-profile articles whose truth spread is largest, the truth spread
    next to each model's predicted spread (the report's section 6.3)."""
    columns = {"model": predictions, **others}
    by_article: dict[str, list[int]] = defaultdict(list)
    for index, p in enumerate(predictions):
        by_article[p.article].append(index)
    multi = [ix for ix in by_article.values() if len({predictions[i].profile for i in ix}) >= 2]
    multi.sort(key=lambda ix: (-_spread([predictions[i].truth for i in ix]), predictions[ix[0]].article))
    rows = []
    for ix in multi[:articles]:
        row = {"article": predictions[ix[0]].article, "title": predictions[ix[0]].title,
               "truth_spread": _spread([predictions[i].truth for i in ix]), "profiles": []}
        for name, column in columns.items():
            scores = [column[i].predicted for i in ix if column[i].predicted is not None]
            row[f"{name}_spread"] = _spread(scores)
        for i in ix:
            row["profiles"].append({"profile": predictions[i].profile, "truth": predictions[i].truth,
                                    **{name: column[i].predicted for name, column in columns.items()}})
        rows.append(row)
    return rows


def _fmt(value, digits=3, percent=False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


AGGREGATE_ROWS = (("Direction accuracy", "direction_accuracy", True), ("MAE", "mae", False),
                  ("Spearman rho", "spearman", False), ("PSR", "psr", True),
                  ("Think block empty rate", "think_empty_rate", True))


def report_markdown(result: dict, spreads: list[dict], baseline: dict | None = None,
                    labels: tuple[str, str] = ("baseline", "model")) -> str:
    lines = ["# Evaluation report", "", "## Aggregate metrics", ""]
    if baseline:
        lines += [f"| Metric | {labels[0]} | {labels[1]} | change |", "|---|---:|---:|---:|"]
    else:
        lines += [f"| Metric | {labels[1]} |", "|---|---:|"]
    for name, key, percent in AGGREGATE_ROWS:
        ours = _fmt(result[key], percent=percent)
        if baseline:
            before = baseline.get(key)
            change = (None if before is None or result[key] is None else result[key] - before)
            change_text = "n/a" if change is None else (f"{100 * change:+.1f} pp" if percent else f"{change:+.3f}")
            lines.append(f"| {name} | {_fmt(before, percent=percent)} | {ours} | {change_text} |")
        else:
            lines.append(f"| {name} | {ours} |")
    failures = f"{result['parse_failures']}/{result['examples']}"
    lines.append(f"| Parse failures | {baseline['parse_failures']}/{baseline['examples']} | {failures} | |"
                 if baseline else f"| Parse failures | {failures} |")
    lines += ["", f"Direction threshold {result['threshold']:g}; PSR over {result['psr_articles']} articles "
              "scored for two or more profiles (share whose predicted spread is >= 2 points).", "",
              "## Per-profile Spearman rho", "", "| Profile | N | rho | Tier |", "|---|---:|---:|---|"]
    per_profile = sorted(result["per_profile"].items(), key=lambda kv: -(kv[1]["spearman"] or -2))
    lines += [f"| {name} | {row['n']} | {_fmt(row['spearman'])} | {row['tier']} |" for name, row in per_profile]
    tiers = defaultdict(int)
    for row in result["per_profile"].values():
        tiers[row["tier"]] += 1
    lines += ["", "Tiers: " + ", ".join(f"{name} {tiers[name]}" for _, name in TIERS) + "."]
    if spreads:
        names = [k.removesuffix("_spread") for k in spreads[0] if k.endswith("_spread") and k != "truth_spread"]
        lines += ["", "## Profile-awareness check", "",
                  "| Article | GT spread | " + " | ".join(f"{n} spread" for n in names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for row in spreads:
            lines.append(f"| {row['title'] or row['article']} | {row['truth_spread']:.1f} | "
                         + " | ".join(f"{row[n + '_spread']:.1f}" for n in names) + " |")
        average = {n: np.mean([r[n + "_spread"] for r in spreads]) for n in ["truth", *names]}
        lines.append(f"| **Average** | **{average['truth']:.2f}** | "
                     + " | ".join(f"**{average[n]:.2f}**" for n in names) + " |")
        worked = spreads[0]
        lines += ["", f"### Worked example: {worked['title'] or worked['article']}", "",
                  "| Profile | Ground truth | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for p in worked["profiles"]:
            lines.append(f"| {p['profile']} | {p['truth']:.1f} | "
                         + " | ".join(_fmt(p[n], 1) for n in names) + " |")
    return "\n".join(lines) + "\n"


def write_predictions(predictions: Sequence[Prediction], path: Path) -> None:
    path.write_text("".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in predictions))


def read_predictions(path: str | Path) -> list[Prediction]:
    return [Prediction(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def load_eval_records(path: str | Path, limit: int = 0) -> list[ParsedRecord]:
    """The eval JSONL's records, validated line by line (errors name the file and line)."""
    records = [parsed for _, parsed in read_jsonl(path)[0]]
    return records[:limit] if limit else records


def evaluate(model, tokenizer, eval_path: str | Path, out_dir: str | Path, *, baseline: str | Path | None = None,
             compare_adapters_off: bool = True, spread_articles: int = 5, threshold: float = 5.0,
             batch_size: int = 16, max_new_tokens: int = 160, limit: int = 0, progress: bool = True,
             labels: tuple[str, str] = ("baseline", "model")) -> dict:
    """Evaluate `model` on an eval JSONL; write predictions.jsonl, metrics.json and eval_report.md.

    compare_adapters_off: also score the profile-awareness articles with the adapters disabled (the base
    model), side by side. baseline: a predictions.jsonl of another model for a two-column report, whose
    columns are headed by `labels` (baseline, this model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_eval_records(eval_path, limit)
    predictions = predict(model, tokenizer, records, batch_size, max_new_tokens, progress)
    write_predictions(predictions, out / "predictions.jsonl")
    result = metrics(predictions, threshold)
    others: dict[str, Sequence[Prediction]] = {}
    baseline_metrics = None
    if baseline:
        base_predictions = read_predictions(baseline)
        baseline_metrics = metrics(base_predictions, threshold)
        others["baseline"] = base_predictions
    chosen = spread_check(predictions, {}, spread_articles)
    if compare_adapters_off and chosen:
        articles = {row["article"] for row in chosen}
        subset = [i for i, p in enumerate(predictions) if p.article in articles]
        with adapters_disabled(model):
            off = predict(model, tokenizer, [records[i] for i in subset], batch_size, max_new_tokens, progress,
                          desc="adapters off")
        write_predictions(off, out / "predictions_adapters_off.jsonl")
        by_index = dict(zip(subset, off, strict=True))
        others["adapters_off"] = [by_index.get(i, Prediction(i, p.profile, p.article, p.title, p.truth, None, 0,
                                                             "not scored", True, ""))
                                  for i, p in enumerate(predictions)]
    spreads = spread_check(predictions, others, spread_articles)
    result["spread_check"] = spreads
    if baseline_metrics:
        result["baseline"] = {k: v for k, v in baseline_metrics.items() if k != "per_profile"}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "eval_report.md").write_text(report_markdown(result, spreads, baseline_metrics, labels))
    return result
