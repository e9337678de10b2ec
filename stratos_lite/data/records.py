"""One JSONL line to a validated record: the prompt as messages, the completion, the score and the ids.

A line is either a scored record

    {"profile_id": "geo-kw", "profile": "Senior geophysicist, KOC Kuwait ...", "article_id": "a17",
     "title": "...", "article": "...", "score": 7.5, "reasoning": "..."}

rendered by the task's own prompt and completion (task.py, the functions inference uses), or a pre-rendered
chat `{"messages": [{"role": ..., "content": ...}, ...], "score": 7.5}` whose last message is the assistant's
completion. An optional `weight` replaces the loss weight of the line's band. A bad line is named by file and
line (or, with on_error="skip", counted by reason).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..model.tokenizer import Message, render_completion
from .task import positive_finite, scoring_completion, scoring_messages

RECORD_FIELDS = ("profile_id", "profile", "article_id", "title", "article", "score", "reasoning")
TEXT_FIELDS = ("profile", "title", "article", "reasoning")  # strings with something in them
ID_FIELDS = ("profile_id", "article_id")  # strings, may be empty


class DataError(ValueError):
    """A bad line of a JSONL file; the message names the file and line."""



def _require(record: dict, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in record]
    if missing:
        raise ValueError(f"missing field {missing[0]!r}")


def _read_text(record: dict, name: str, blank_ok: bool = False) -> str:
    """A text field as given: a string (a number or list is refused, not turned into text), and not blank
    unless `blank_ok`. The reason's first part, before ':', is what a skip is counted under."""
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string: got {type(value).__name__} {value!r:.40}")
    if not blank_ok and not value.strip():
        raise ValueError(f"field {name!r} is blank")
    return value


def _read_weight(record: dict) -> float | None:
    """The line's own loss weight (it replaces its band's), or None when it has none."""
    if "weight" not in record:
        return None
    if not positive_finite(record["weight"]):
        raise ValueError(f"weight must be a positive finite number, got {record['weight']!r}")
    return float(record["weight"])


def _read_score(record: dict) -> float:
    score = record.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise ValueError(f"score must be a number, got {score!r}")
    if not 0 <= score <= 10:
        raise ValueError(f"score {score} is outside 0-10")
    return float(score)


@dataclass
class ParsedRecord:
    """A validated line: the prompt as messages, the completion text, and what the report needs."""
    messages: list[Message]
    completion: str
    score: float
    profile_id: str
    article_id: str
    fields: tuple[str, str, str] | None  # (profile, title, article) of a scored record, to re-render shorter
    weight: float | None = None  # the line's own loss weight, replacing its band's

    @property
    def title(self) -> str:
        return self.fields[1] if self.fields else ""


def parse_record(record: dict) -> ParsedRecord:
    if not isinstance(record, dict):
        raise ValueError("a line must hold a JSON object")
    if "messages" in record:
        _require(record, ["score"])
        score = _read_score(record)
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("messages must be a non-empty list")
        if not all(isinstance(t, dict) and {"role", "content"} <= t.keys() for t in turns):
            raise ValueError("each message must be an object with a role and a content")
        messages = [Message(t.get("role"), _read_text(t, "content", blank_ok=True)) for t in turns]
        if messages[-1].role != "assistant" or any(m.role == "assistant" for m in messages[:-1]):
            raise ValueError("the last message, and only it, must be the assistant's completion")
        if not messages[-1].content.strip():
            raise ValueError("empty completion")
        return ParsedRecord(messages[:-1], render_completion(messages[-1].content), score,
                            str(record.get("profile_id", "")), str(record.get("article_id", "")), None,
                            _read_weight(record))
    _require(record, RECORD_FIELDS)
    score = _read_score(record)
    profile, title, article, reasoning = (_read_text(record, name) for name in TEXT_FIELDS)
    profile_id, article_id = (_read_text(record, name, blank_ok=True) for name in ID_FIELDS)
    return ParsedRecord(scoring_messages(profile, title, article), scoring_completion(score, reasoning), score,
                        profile_id, article_id, (profile, title, article), _read_weight(record))


def read_jsonl(path: str | Path, on_error: str = "raise") -> tuple[list[tuple[int, ParsedRecord]], Counter]:
    """Validated records with their line numbers; with on_error="skip", bad lines are counted by reason."""
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    records, skipped = [], Counter()
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append((number, parse_record(json.loads(line))))
            except (ValueError, AttributeError, TypeError) as error:
                reason = "malformed JSON" if isinstance(error, json.JSONDecodeError) else str(error)
                if on_error == "raise":
                    raise DataError(f"{path}:{number}: {reason}") from None
                skipped[reason.split(":")[0]] += 1
    return records, skipped


