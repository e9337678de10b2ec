"""The report's metrics (its section 6) from predictions: direction accuracy, MAE, Spearman overall and per
profile, PSR, think-empty rate, parse failures, the band confusion, agreement between two engines, and the
profile-awareness spread check."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..data.task import DEFAULT_BANDS, Band, band_index, tier
from .predictions import Prediction


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
    from scipy.stats import spearmanr  # scipy.stats takes most of a second to import: only evaluation pays it

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
