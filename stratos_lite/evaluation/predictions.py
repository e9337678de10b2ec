"""Predictions: each eval record's prompt completed by an engine and read back, and their JSONL file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.records import ParsedRecord, read_jsonl
from ..data.task import parse_completion
from ..storage.atomic import write_text
from .engines import timed_complete


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



def write_predictions(predictions: Sequence[Prediction], path: Path) -> None:
    write_text(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in predictions))


def read_predictions(path: str | Path) -> list[Prediction]:
    return [Prediction(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def load_eval_records(path: str | Path, limit: int = 0) -> list[ParsedRecord]:
    """The eval JSONL's records, validated line by line (errors name the file and line)."""
    records = [parsed for _, parsed in read_jsonl(path)[0]]
    return records[:limit] if limit else records
