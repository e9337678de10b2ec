"""Which GGUF to ship: the quantizations of one model scored on the task beside the torch model, and the
smallest file whose scores stay within a stated tolerance of it.

The inputs are `evaluate(model, ..., gguf=[files])`'s result: the torch model's metrics and one entry per
file under "engines". The default tolerance: Spearman no more than 0.02 below the torch model's, and no
parse failure the torch model did not have. Where the torch model's Spearman is undefined (it gave every
example one score), a file is within tolerance only if it answers as the torch model does, every example
within 0.5 points.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .quant_types import K_QUANTS

SPEARMAN_TOLERANCE = 0.02
SAME_SIZE = 0.005  # files within 0.5 % of each other's size hold the same quant (metadata aside)


@dataclass(frozen=True)
class QuantScore:
    """One GGUF file's size, speed in llama.cpp and task metrics, with its agreement with the torch model."""
    path: Path
    size_bytes: int
    examples_per_s: float
    spearman: float | None
    mae: float | None
    direction_accuracy: float | None
    parse_failures: int
    agreement: float | None  # share of examples within 0.5 points of the torch model's score
    kl_divergence: float | None = None  # mean next-token KL from the torch model over the eval completions

    @property
    def name(self) -> str:
        return self.path.name


def quant_files(out: str | Path, quants: list[str], with_matrix: bool = False,
                 also_without: bool = False) -> list[tuple[str, Path, bool]]:
    """(quant, file, with the matrix) for each file to write: `out` itself for one file, NAME-QUANT.gguf beside
    it for several, and NAME-QUANT-imatrix.gguf for a K-quant written both with and without a matrix."""
    out = Path(out)
    jobs = []
    for quant in quants:
        weighted = with_matrix and quant in K_QUANTS  # q8_0 and the float types have no use for a matrix
        both = weighted and also_without
        jobs += [(quant, "", False)] if both or not weighted else []
        jobs += [(quant, "-imatrix" if both else "", True)] if weighted else []
    if len(jobs) == 1:
        return [(jobs[0][0], out, jobs[0][2])]
    suffix = out.suffix or ".gguf"
    return [(quant, out.with_name(f"{out.stem}-{quant}{tag}{suffix}"), matrix) for quant, tag, matrix in jobs]


def quant_scores(result: dict) -> list[QuantScore]:
    """A row per whole GGUF file that `evaluate` scored, smallest file first, and of files of one size (a quant
    with and without an importance matrix: the same tensors, a few metadata bytes apart) the one nearer the
    torch model first (a base with a LoRA adapter file over it is a pair, not a quant of the model, and is left
    out)."""
    rows = [QuantScore(Path(engine["file"]), Path(engine["file"]).stat().st_size, engine["examples_per_s"],
                       engine["spearman"], engine["mae"], engine["direction_accuracy"], engine["parse_failures"],
                       engine["agreement"]["within_0_5"], engine.get("kl_divergence"))
            for engine in result.get("engines", {}).values() if "lora" not in engine]
    rows.sort(key=lambda row: row.size_bytes)
    groups: list[list[QuantScore]] = []
    for row in rows:
        if groups and row.size_bytes <= groups[-1][0].size_bytes * (1 + SAME_SIZE):
            groups[-1].append(row)
        else:
            groups.append([row])
    return [row for group in groups for row in sorted(group, key=_nearness)]


def _nearness(row: QuantScore) -> float:
    return float("inf") if row.kl_divergence is None else row.kl_divergence


def within_tolerance(row: QuantScore, result: dict, tolerance: float = SPEARMAN_TOLERANCE) -> bool:
    """Scores as well as the torch model, up to `tolerance` in Spearman and with no new parse failures."""
    if row.parse_failures > result["parse_failures"]:
        return False
    reference = result["spearman"]
    if reference is None:
        return row.agreement == 1.0
    return row.spearman is not None and row.spearman >= reference - tolerance


def smallest_within(result: dict, tolerance: float = SPEARMAN_TOLERANCE) -> QuantScore | None:
    """The smallest file within tolerance of the torch model, or None when none is."""
    return next((row for row in quant_scores(result) if within_tolerance(row, result, tolerance)), None)


def format_quant_table(result: dict, tolerance: float = SPEARMAN_TOLERANCE) -> str:
    """A markdown table of every scored file beside the torch model, and the choice it leads to."""
    def number(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    def divergence(value):  # three significant digits: a good quant's divergence is far below 0.001
        return "n/a" if value is None else f"{value:.3g}"

    lines = ["| file | MB | examples/s | Spearman | MAE | direction | parse failures | agrees with torch | "
             "KL from torch | within |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
             f"| torch model | | {number(result.get('examples_per_s'), 1)} | {number(result['spearman'])} | "
             f"{number(result['mae'])} | {number(result['direction_accuracy'])} | {result['parse_failures']} | | | |"]
    for row in quant_scores(result):
        lines.append(f"| {row.name} | {row.size_bytes / 1e6:.1f} | {number(row.examples_per_s, 1)} | "
                     f"{number(row.spearman)} | {number(row.mae)} | {number(row.direction_accuracy)} | "
                     f"{row.parse_failures} | {number(row.agreement)} | {divergence(row.kl_divergence)} | "
                     f"{'yes' if within_tolerance(row, result, tolerance) else 'no'} |")
    choice = smallest_within(result, tolerance)
    rule = (f"Spearman within {tolerance} of the torch model's and no new parse failures" if result["spearman"]
            is not None else "the torch model's Spearman is undefined: the same answers, no new parse failures")
    lines.append("")
    lines.append(f"smallest within tolerance ({rule}): {choice.name}" if choice else
                 f"no file is within tolerance ({rule}): ship a larger quant or f16")
    return "\n".join(lines)
