"""The end-of-training summary (like the report's section 5) and a loss-curve SVG, from metrics.jsonl rows."""

from __future__ import annotations

import math
from pathlib import Path

from ..storage.atomic import write_text
from ..storage.svg import svg_open


def _phase(step: int, total: int, warmup: int) -> str:
    if step <= warmup:
        return "warmup"
    return "final step" if step == total else "training"


def summary_rows(metrics: list[dict], rows: int = 12) -> list[dict]:
    """About `rows` evenly spaced steps, always with the first and the last."""
    if len(metrics) <= rows:
        return metrics
    picks = {round(i * (len(metrics) - 1) / (rows - 1)) for i in range(rows)}
    return [metrics[i] for i in sorted(picks)]


def summary_text(metrics: list[dict], warmup: int) -> str:
    if not metrics:
        return "no steps were run"
    total = metrics[-1]["step"]
    lines = [f"{'step':>7}{'loss':>10}{'grad norm':>11}{'lr':>11}  phase", "-" * 50]
    for m in summary_rows(metrics):
        lines.append(f"{m['step']:>7}{m['loss']:>10.4f}{m['grad_norm']:>11.3f}{m['lr']:>11.2e}  "
                     f"{_phase(m['step'], total, warmup)}{'  (skipped: non-finite)' if m.get('skipped') else ''}")
    finite = [m["loss"] for m in metrics if math.isfinite(m["loss"])]
    seconds = sum(m["step_seconds"] for m in metrics)
    tokens = sum(m["tokens"] for m in metrics)
    lines += ["-" * 50,
              f"average training loss {sum(finite) / max(len(finite), 1):.4f} over {len(metrics)} steps; "
              f"{seconds / len(metrics):.3f} s/step, {tokens / max(seconds, 1e-9):.0f} tokens/s"]
    evals = [m for m in metrics if "eval_loss" in m]
    if evals:
        lines.append("held-out loss: " + ", ".join(f"step {m['step']} {m['eval_loss']:.4f}" for m in evals))
    return "\n".join(lines)


def loss_curve_svg(metrics: list[dict], width: int = 640, height: int = 320) -> str:
    """Training loss per step (and held-out loss where measured) as a self-contained SVG."""
    points = [(m["step"], m["loss"]) for m in metrics if math.isfinite(m["loss"])]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"></svg>\n'
    pad = 48
    steps = [s for s, _ in points + evals]
    losses = [v for _, v in points + evals]
    lo, hi = min(losses), max(losses)
    x_of = lambda s: pad + (s - min(steps)) / max(max(steps) - min(steps), 1) * (width - 2 * pad)
    y_of = lambda v: height - pad - (v - lo) / max(hi - lo, 1e-12) * (height - 2 * pad)

    def polyline(series, color):
        coords = " ".join(f"{x_of(s):.1f},{y_of(v):.1f}" for s, v in series)
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>'

    parts = [*svg_open(width, height),
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{pad}" y="{pad - 8}">loss (train: blue, held-out: orange)</text>',
             f'<text x="4" y="{pad + 4}">{hi:.3g}</text>', f'<text x="4" y="{height - pad}">{lo:.3g}</text>',
             f'<text x="{pad}" y="{height - pad + 16}">step {min(steps)}</text>',
             f'<text x="{width - pad - 40}" y="{height - pad + 16}">step {max(steps)}</text>',
             polyline(points, "#1f77b4")]
    if evals:
        parts.append(polyline(evals, "#ff7f0e"))
    return "\n".join([*parts, "</svg>"]) + "\n"


def write_training_summary(metrics: list[dict], out_dir: Path, config) -> str:
    total = metrics[-1]["step"] if metrics else 0
    text = summary_text(metrics, math.ceil(config.warmup_ratio * total))
    write_text(out_dir / "summary.md", f"# Training summary\n\n```\n{text}\n```\n")
    write_text(out_dir / "loss_curve.svg", loss_curve_svg(metrics))
    return text
