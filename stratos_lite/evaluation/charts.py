"""Pictures for the evaluation report, as self-contained SVG text (no plotting dependency): predicted
against true scores, and the true-band x predicted-band confusion with each band's MAE."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from ..storage.svg import svg_open


def scatter_svg(truth: Sequence[float], predicted: Sequence[float | None], title: str, size: int = 360) -> str:
    """Each parsed example as a dot at (true score, predicted score) on 0-10 axes, with the diagonal."""
    pad = 40
    span = size - 2 * pad
    at = lambda score: pad + score / 10 * span
    parts = svg_open(size, size)
    parts += [f'<text x="{pad}" y="{pad - 14}">{escape(title)}</text>',
              f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" fill="none" stroke="black"/>',
              f'<line x1="{pad}" y1="{pad + span}" x2="{pad + span}" y2="{pad}" stroke="#bbb" stroke-dasharray="4"/>',
              f'<text x="{pad + span / 2 - 20}" y="{size - 8}">true score</text>',
              f'<text x="8" y="{pad + span / 2}" transform="rotate(-90 12 {pad + span / 2})">predicted</text>']
    for tick in range(0, 11, 2):
        parts += [f'<text x="{at(tick) - 3}" y="{pad + span + 14}">{tick}</text>',
                  f'<text x="{pad - 16}" y="{size - at(tick) + 4}">{tick}</text>']
    parts += [f'<circle cx="{at(t):.1f}" cy="{size - at(p):.1f}" r="2.5" fill="#1f77b4" fill-opacity="0.45"/>'
              for t, p in zip(truth, predicted, strict=True) if p is not None]
    return "\n".join([*parts, "</svg>"]) + "\n"


def confusion_svg(confusion: dict, title: str) -> str:
    """The band_confusion() matrix as a heat map (rows: true band, columns: predicted band), with the
    count in each cell and the MAE of each true band at the end of its row."""
    names, matrix, maes = confusion["bands"], confusion["matrix"], confusion["mae"]
    cell, left, top = 56, 90, 60
    width, height = left + cell * len(names) + 80, top + cell * len(names) + 20
    parts = svg_open(width, height)
    parts += [f'<text x="{left}" y="18">{escape(title)}</text>',
              f'<text x="{left}" y="36">predicted band (columns) by true band (rows)</text>',
              f'<text x="{left + cell * len(names) + 8}" y="{top - 6}">MAE</text>']
    for j, name in enumerate(names):
        parts.append(f'<text x="{left + j * cell + 4}" y="{top - 6}">{escape(name[:8])}</text>')
    for i, (name, row) in enumerate(zip(names, matrix, strict=True)):
        total = max(sum(row), 1)
        y = top + i * cell
        parts.append(f'<text x="4" y="{y + cell / 2 + 4}">{escape(name)}</text>')
        for j, count in enumerate(row):
            shade = 255 - round(200 * count / total)
            parts += [f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" '
                      f'fill="rgb({shade},{shade},255)" stroke="white"/>',
                      f'<text x="{left + j * cell + cell / 2 - 8}" y="{y + cell / 2 + 4}">{count}</text>']
        mae = "n/a" if maes[i] is None else f"{maes[i]:.2f}"
        parts.append(f'<text x="{left + cell * len(names) + 8}" y="{y + cell / 2 + 4}">{mae}</text>')
    return "\n".join([*parts, "</svg>"]) + "\n"
