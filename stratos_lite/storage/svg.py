"""SVG documents as text, the one piece the training summary's loss curve and the evaluation report's charts
share (no plotting dependency)."""

from __future__ import annotations


def svg_open(width: int, height: int) -> list[str]:
    """The opening of an SVG document on a white background (close it with '</svg>')."""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
            f'font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
