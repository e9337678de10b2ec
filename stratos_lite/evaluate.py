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

from .atomic import write_text
from .data import DEFAULT_BANDS, Band, ParsedRecord, band_index, read_jsonl
from .dora import adapters_disabled
from .engines import LlamaCppEngine, TorchEngine, timed_complete
from .eval_charts import confusion_svg, scatter_svg
from .metrics_log import log_generation_metrics
from .serving import served_prompt_checks

THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
TIERS = ((0.8, "Excellent"), (0.7, "Strong"), (0.65, "Good"), (0.5, "Moderate"), (-math.inf, "Weak"))


@dataclass(frozen=True)
class ParsedScore:
    """A completion read back: the score (None when unreadable), the <think> text, and the parser's verdict."""
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
    """One evaluated example: the eval line's id, profile, article and true score, what the engine answered
    (`raw`) and what was read from it (predicted score or None, think length, status); predictions.jsonl
    holds one a line."""
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


def predict(engine, tokenizer, parsed: Sequence[ParsedRecord], max_new_tokens: int = 160,
            progress: bool = True) -> tuple[list[Prediction], float]:
    """Greedy completions of each record's prompt ids by `engine` (see engines.py), parsed; and the
    engine's examples per second."""
    prompts = [tokenizer.encode_prompt(p.messages) for p in parsed]
    outputs, rate = timed_complete(engine, prompts, max_new_tokens, tokenizer.stop_ids, progress)
    predictions = []
    for i, (p, ids) in enumerate(zip(parsed, outputs, strict=True)):
        text = tokenizer.decode(ids)
        reading = parse_completion(text)
        predictions.append(Prediction(i, p.profile_id, p.article_id, p.title, p.score, reading.score,
                                      len(reading.think.strip()), reading.status, reading.think_empty, text))
    return predictions, rate


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
    result["band_confusion"] = band_confusion(predictions)
    return result


def band_confusion(predictions: Sequence[Prediction], bands: Sequence[Band] = DEFAULT_BANDS) -> dict:
    """Counts of (true band, predicted band) over the parsed examples, and the MAE within each true band
    (the rare high bands are where a scorer earns its keep)."""
    matrix = [[0] * len(bands) for _ in bands]
    errors: dict[int, list[float]] = defaultdict(list)
    for p in predictions:
        if p.predicted is not None:
            true_band = band_index(p.truth, bands)
            matrix[true_band][band_index(p.predicted, bands)] += 1
            errors[true_band].append(abs(p.predicted - p.truth))
    return {"bands": [b.name for b in bands], "matrix": matrix,
            "mae": [float(np.mean(errors[i])) if errors[i] else None for i in range(len(bands))]}


def agreement(predictions: Sequence[Prediction], reference: Sequence[Prediction]) -> dict:
    """How closely one engine's scores follow another's: the share of all examples that both parsed with
    scores within 0.5 points, and the Spearman between the two engines' scores where both parsed."""
    pairs = [(p.predicted, r.predicted) for p, r in zip(predictions, reference, strict=True)
             if p.predicted is not None and r.predicted is not None]
    ours, theirs = (np.array(side) for side in zip(*pairs, strict=True)) if pairs else (np.zeros(0), np.zeros(0))
    return {"compared": len(pairs),
            "within_0_5": float(np.mean(np.abs(ours - theirs) <= 0.5) * len(pairs) / len(predictions))
            if predictions and pairs else None,
            "spearman": _spearman(ours, theirs)}


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
    write_text(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in predictions))


def read_predictions(path: str | Path) -> list[Prediction]:
    return [Prediction(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def load_eval_records(path: str | Path, limit: int = 0) -> list[ParsedRecord]:
    """The eval JSONL's records, validated line by line (errors name the file and line)."""
    records = [parsed for _, parsed in read_jsonl(path)[0]]
    return records[:limit] if limit else records


def evaluate_gguf(path: str | Path, tokenizer, records: Sequence[ParsedRecord], reference: Sequence[Prediction],
                  out_dir: Path, max_new_tokens: int = 160, threshold: float = 5.0, progress: bool = True,
                  **engine_options) -> tuple[dict, list[Prediction]]:
    """The same records through llama.cpp: its predictions (also written to predictions_<file stem>.jsonl)
    and their metrics, throughput, agreement with `reference` (the torch model's predictions) and the
    served-prompt checks."""
    path = Path(path)
    engine = LlamaCppEngine(path, **engine_options)
    try:
        modelfile = path.with_name("Modelfile")
        checks = served_prompt_checks(engine.llm, tokenizer, records[0].messages,
                                      modelfile if modelfile.is_file() else None)
        predictions, rate = predict(engine, tokenizer, records, max_new_tokens, progress)
    finally:
        engine.close()
    write_predictions(predictions, out_dir / f"predictions_{path.stem}.jsonl")
    summary = {**metrics(predictions, threshold), "examples_per_s": rate, "file": str(path),
               "agreement": agreement(predictions, reference), "prompt_checks": [c.to_dict() for c in checks]}
    return summary, predictions


def evaluate(model, tokenizer, eval_path: str | Path, out_dir: str | Path, *, baseline: str | Path | None = None,
             compare_adapters_off: bool = True, spread_articles: int = 5, threshold: float = 5.0,
             batch_size: int = 16, max_new_tokens: int = 160, limit: int = 0, progress: bool = True,
             labels: tuple[str, str] = ("baseline", "model"), gguf: Sequence[str | Path] = (),
             gguf_options: dict | None = None, tensorboard: str | Path | None = None, step: int = 0) -> dict:
    """Evaluate `model` on an eval JSONL; write predictions.jsonl, metrics.json and eval_report.md.

    compare_adapters_off: also score the profile-awareness articles with the adapters disabled (the base
    model), side by side. baseline: a predictions.jsonl of another model for a two-column report, whose
    columns are headed by `labels` (baseline, this model). gguf: exported files to run through llama.cpp
    on the same prompts, each a column of the report beside the torch model, with its agreement and the
    check of the prompts servers will build from it (`gguf_options` go to LlamaCppEngine). tensorboard: a
    folder (a run's out_dir/tensorboard) to add every column's metrics to as scalars at `step`.

    Returns the metrics of the model (the dict written to metrics.json), with the GGUF columns under
    "engines"; see `metrics` for what each holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_eval_records(eval_path, limit)
    predictions, rate = predict(TorchEngine(model, tokenizer.pad_id, batch_size), tokenizer, records, max_new_tokens,
                                progress)
    write_predictions(predictions, out / "predictions.jsonl")
    result = metrics(predictions, threshold)
    result["examples_per_s"] = rate
    columns = {labels[1]: predictions}
    engines: dict[str, dict] = {}
    for path in gguf:
        name = Path(path).name
        engines[name], columns[name] = evaluate_gguf(path, tokenizer, records, predictions, out, max_new_tokens,
                                                     threshold, progress, **(gguf_options or {}))
    charts = write_charts(out, columns)
    others: dict[str, Sequence[Prediction]] = {}
    baseline_metrics = None
    if baseline:
        base_predictions = read_predictions(baseline)
        baseline_metrics = metrics(base_predictions, threshold)
        others["baseline"] = base_predictions
    chosen = spread_check(predictions, {}, spread_articles)
    if compare_adapters_off and chosen:
        others["adapters_off"] = _adapters_off_column(model, tokenizer, records, predictions, chosen, out,
                                                      batch_size, max_new_tokens, progress)
    spreads = spread_check(predictions, others, spread_articles)
    result["spread_check"] = spreads
    if baseline_metrics:
        result["baseline"] = {k: v for k, v in baseline_metrics.items() if k != "per_profile"}
    if engines:
        result["engines"] = engines
    write_text(out / "metrics.json", json.dumps(result, indent=2))
    report = report_markdown(result, spreads, baseline_metrics, labels) + engines_markdown(labels[1], result, engines)
    write_text(out / "eval_report.md", report + bands_markdown(charts, {labels[1]: result, **engines}))
    if tensorboard is not None:
        log_generation_metrics(tensorboard, step, {labels[1]: result, **engines})
    return result


def _adapters_off_column(model, tokenizer, records, predictions, chosen, out: Path, batch_size: int,
                         max_new_tokens: int, progress: bool) -> list[Prediction]:
    """The base model's predictions (adapters bypassed) on the profile-awareness articles `chosen`, written
    to predictions_adapters_off.jsonl; every other example stands as "not scored"."""
    articles = {row["article"] for row in chosen}
    subset = [i for i, p in enumerate(predictions) if p.article in articles]
    with adapters_disabled(model):
        off, _ = predict(TorchEngine(model, tokenizer.pad_id, batch_size, name="adapters off"), tokenizer,
                         [records[i] for i in subset], max_new_tokens, progress)
    write_predictions(off, out / "predictions_adapters_off.jsonl")
    by_index = dict(zip(subset, off, strict=True))
    return [by_index.get(i, Prediction(i, p.profile, p.article, p.title, p.truth, None, 0, "not scored", True, ""))
            for i, p in enumerate(predictions)]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_charts(out: Path, columns: dict[str, Sequence[Prediction]]) -> dict[str, tuple[str, str]]:
    """scatter_<engine>.svg and bands_<engine>.svg beside the report; returns their names per engine."""
    names = {}
    for name, predictions in columns.items():
        scatter, bands = f"scatter_{_slug(name)}.svg", f"bands_{_slug(name)}.svg"
        write_text(out / scatter, scatter_svg([p.truth for p in predictions], [p.predicted for p in predictions],
                                              f"{name}: predicted vs true score"))
        write_text(out / bands, confusion_svg(band_confusion(predictions), f"{name}: bands"))
        names[name] = (scatter, bands)
    return names


ENGINE_ROWS = (*AGGREGATE_ROWS, ("Parse failures", "parse_failures", False), ("Examples/s", "examples_per_s", False))


def engines_markdown(torch_name: str, result: dict, engines: dict[str, dict]) -> str:
    """The torch model and each GGUF side by side, their agreement, and the served-prompt checks."""
    if not engines:
        return ""
    columns = {torch_name: result, **engines}
    lines = ["", "## Engines side by side", "", "| Metric | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, key, percent in ENGINE_ROWS:
        cells = [str(c[key]) if key == "parse_failures" else _fmt(c[key], 2 if key == "examples_per_s" else 3,
                                                                  percent) for c in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tiers = lambda c: ", ".join(f"{t} {sum(r['tier'] == t for r in c['per_profile'].values())}" for _, t in TIERS)
    lines.append("| Per-profile tiers | " + " | ".join(tiers(c) for c in columns.values()) + " |")
    for label, key, percent in (("Agreement with torch (abs diff <= 0.5)", "within_0_5", True),
                                ("Spearman with torch", "spearman", False)):
        lines.append(f"| {label} | - | " + " | ".join(_fmt(e["agreement"][key], percent=percent)
                                                     for e in engines.values()) + " |")
    lines += ["", "## Prompts servers will build", "",
              "Each GGUF's chat template and Modelfile rendered for the first example's messages, tokenized by the "
              "GGUF's own vocabulary, against the prompt ids the model was trained on.", ""]
    for name, engine in engines.items():
        failed = [c for c in engine["prompt_checks"] if not c["ok"]]
        if failed:
            lines.append(f"**WARNING: {name}: {len(failed)} way(s) of serving it build a prompt that differs from "
                         "the training prompt; served scores will not be the scores measured here.**")
        lines += [f"- {name}, {c['server']}: {'OK' if c['ok'] else 'MISMATCH'}: {c['detail']}"
                  for c in engine["prompt_checks"]]
    return "\n".join(lines) + "\n"


def bands_markdown(charts: dict[str, tuple[str, str]], columns: dict[str, dict]) -> str:
    """Per engine: the true x predicted band table with each band's MAE, and its two pictures."""
    lines = ["", "## Scores by band", ""]
    for name, result in columns.items():
        confusion = result["band_confusion"]
        names = confusion["bands"]
        lines += [f"### {name}", "", "| true \\ predicted | " + " | ".join(names) + " | MAE |",
                  "|---|" + "---:|" * (len(names) + 1)]
        lines += [f"| {band} | " + " | ".join(str(n) for n in row) + f" | {_fmt(mae, 2)} |"
                  for band, row, mae in zip(names, confusion["matrix"], confusion["mae"], strict=True)]
        scatter, bands = charts[name]
        lines += ["", f"![{name}: predicted vs true]({scatter}) ![{name}: bands]({bands})", ""]
    return "\n".join(lines)
