"""The evaluation report as markdown: aggregate metrics (beside a baseline), per-profile tiers, the
profile-awareness check, engines side by side with the served-prompt checks, and scores by band with their
pictures."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.task import TIERS
from ..storage.atomic import write_text
from .charts import confusion_svg, scatter_svg
from .metrics import band_confusion
from .predictions import Prediction


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
    if any("kl_divergence" in e for e in engines.values()):
        lines.append("| Next-token KL from torch (completions) | - | "
                     + " | ".join("n/a" if e.get("kl_divergence") is None else f"{e['kl_divergence']:.3g}"
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
