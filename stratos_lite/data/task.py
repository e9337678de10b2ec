"""The scoring task's format, both ways: what training writes and what evaluation reads back, side by side.

    prompt       SYSTEM_PROMPT, then the reader's profile and the article (scoring_messages)
    completion   <think>\\n{reasoning}\\n</think>\\n\\n{"score": 7.5}<|im_end|>  (scoring_completion)
    parse        the completion back to its think text and score (parse_completion)
    bands        score ranges with a loss weight and a sampling share each (the report's five)
    tiers        what a per-profile Spearman is called in the report (Excellent ... Weak)

The prompt is the one inference builds too, so a served prompt and a training prompt share their prefix token
for token (model/tokenizer.py renders the ChatML around it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..model.tokenizer import Message, render_completion

SYSTEM_PROMPT = (
    "You score how relevant a news article is to one reader's professional profile, from 0 (irrelevant) to "
    "10 (critical). Think about the reader's field, region and interests, then answer with JSON."
)


def scoring_messages(profile: str, title: str, article: str) -> list[Message]:
    """The prompt for scoring one article for one profile: used for training and for inference."""
    user = (f"Reader profile:\n{profile.strip()}\n\nArticle title: {title.strip()}\n"
            f"Article:\n{article.strip()}\n\nHow relevant is this article to this reader?")
    return [Message("system", SYSTEM_PROMPT), Message("user", user)]


def score_text(score: float) -> str:
    """A score as the answer writes it: a JSON number, to two decimals at most (7.5, 0.0, 10.0)."""
    return json.dumps(round(float(score), 2))


def scoring_completion(score: float, reasoning: str) -> str:
    """The assistant's answer: a think block with the reasoning, then the score as JSON."""
    return render_completion(f'{{"score": {score_text(score)}}}', reasoning=reasoning)


# Reading a completion back -------------------------------------------------------------------------------

THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


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


# Bands and tiers -----------------------------------------------------------------------------------------

def positive_finite(value) -> bool:
    """A number (not a bool) above 0 and below infinity: what a loss weight must be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


@dataclass(frozen=True)
class Band:
    name: str
    low: float
    high: float  # exclusive, except for the top band, which includes its upper edge
    weight: float  # per-example loss weight
    target_share: float  # share of sampled examples

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"band {self.name!r}: low {self.low!r} and high {self.high!r} must be finite, low < high")
        if not positive_finite(self.weight):
            raise ValueError(f"band {self.name!r}: weight {self.weight!r} must be a positive finite number")
        if not (isinstance(self.target_share, int | float) and 0 <= self.target_share <= 1):
            raise ValueError(f"band {self.name!r}: target_share {self.target_share!r} must be in [0, 1]")


DEFAULT_BANDS = (
    Band("noise", 0.0, 2.0, 0.5, 0.750),
    Band("tangential", 2.0, 4.0, 1.0, 0.124),
    Band("moderate", 4.0, 6.0, 1.5, 0.047),
    Band("high", 6.0, 8.0, 2.0, 0.045),
    Band("critical", 8.0, 10.0, 3.0, 0.034),
)


def band_index(score: float, bands: Sequence[Band] = DEFAULT_BANDS) -> int:
    for index, band in enumerate(bands):
        if band.low <= score < band.high or (index == len(bands) - 1 and score == band.high):
            return index
    raise ValueError(f"score {score} falls in no band ({bands[0].low}..{bands[-1].high})")


TIERS = ((0.8, "Excellent"), (0.7, "Strong"), (0.65, "Good"), (0.5, "Moderate"), (-math.inf, "Weak"))


def tier(rho: float) -> str:
    return next(name for bound, name in TIERS if rho > bound or (bound == 0.7 and rho == 0.7))
