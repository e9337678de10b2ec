"""Scored JSONL records to weighted, completion-only training examples, with a dataset report.

A line is either a scored record

    {"profile_id": "geo-kw", "profile": "Senior geophysicist, KOC Kuwait ...", "article_id": "a17",
     "title": "...", "article": "...", "score": 7.5, "reasoning": "..."}

rendered by `scoring_messages` + `scoring_completion` (the same functions inference uses), or a
pre-rendered chat `{"messages": [{"role": ..., "content": ...}, ...], "score": 7.5}` whose last message
is the assistant's completion. Only the completion (its <|im_end|> included) carries labels.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .atomic import write_text
from .tokenizer import Message, Tokenizer, render_completion

if TYPE_CHECKING:  # for the annotation only: the settings module does not depend on the data
    from .config import TrainConfig

IGNORE_INDEX = -100

SYSTEM_PROMPT = (
    "You score how relevant a news article is to one reader's professional profile, from 0 (irrelevant) to "
    "10 (critical). Think about the reader's field, region and interests, then answer with JSON."
)
RECORD_FIELDS = ("profile_id", "profile", "article_id", "title", "article", "score", "reasoning")
TEXT_FIELDS = ("profile", "title", "article", "reasoning")  # strings with something in them
ID_FIELDS = ("profile_id", "article_id")  # strings, may be empty


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
        if not _positive_finite(self.weight):
            raise ValueError(f"band {self.name!r}: weight {self.weight!r} must be a positive finite number")
        if not (isinstance(self.target_share, int | float) and 0 <= self.target_share <= 1):
            raise ValueError(f"band {self.name!r}: target_share {self.target_share!r} must be in [0, 1]")


def _positive_finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


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


class DataError(ValueError):
    """A bad line of a JSONL file; the message names the file and line."""


@dataclass
class Example:
    input_ids: torch.Tensor
    labels: torch.Tensor
    score: float
    band: int
    weight: float
    profile_id: str
    article_id: str
    truncated: bool


@dataclass
class DatasetReport:
    source: str
    bands: list[dict] = field(default_factory=list)
    profiles: dict[str, int] = field(default_factory=dict)
    token_lengths: dict[str, float] = field(default_factory=dict)
    truncated: int = 0
    did_not_fit: int = 0
    skipped_lines: dict[str, int] = field(default_factory=dict)
    contrastive_groups: int = 0
    contrastive_examples: int = 0
    sha256: str = ""  # of the JSONL file read (empty for data made in memory)
    length_histogram: dict[str, int] = field(default_factory=dict)  # examples by token length, 128-token bins

    def write(self, folder: str | Path) -> None:
        """dataset_report.md (tables for people) and dataset_report.json (the same numbers for tools)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "dataset_report.md", self.to_markdown())
        write_text(folder / "dataset_report.json", json.dumps(asdict(self), indent=2))

    def to_markdown(self) -> str:
        rows = [f"# Dataset report: {self.source}", "",
                "| band | weight | count | raw % | target % |", "|---|---:|---:|---:|---:|"]
        rows += [f"| {b['name']} [{b['low']:g}, {b['high']:g}{']' if b is self.bands[-1] else ')'} | "
                 f"{b['weight']:g} | {b['count']} | {b['raw_pct']:.1f} | {b['target_pct']:.1f} |" for b in self.bands]
        lengths = ", ".join(f"{k} {v:g}" for k, v in self.token_lengths.items())
        rows += ["", f"Token lengths: {lengths}.",
                 f"Article text shortened to fit: {self.truncated}; could not fit even so (left out): "
                 f"{self.did_not_fit}.",
                 f"Contrastive groups (one article, several profiles, spread >= 2): {self.contrastive_groups} "
                 f"covering {self.contrastive_examples} examples."]
        if self.skipped_lines:
            rows.append("Skipped lines: " + ", ".join(f"{k}: {v}" for k, v in self.skipped_lines.items()) + ".")
        rows += ["", "| tokens | examples |", "|---|---:|"]
        rows += [f"| {span} | {count} |" for span, count in self.length_histogram.items()]
        rows += ["", "| profile | examples |", "|---|---:|"]
        rows += [f"| {name} | {count} |" for name, count in sorted(self.profiles.items())]
        return "\n".join(rows) + "\n"


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
    if not _positive_finite(record["weight"]):
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


def _fit_article(tokenizer: Tokenizer, parsed: ParsedRecord, max_len: int):
    """Encode the record, shortening the article text (never the completion) until it fits max_len.
    Returns (chat, truncated), or (None, True) when it cannot fit."""
    chat = tokenizer.encode_chat(parsed.messages, parsed.completion)
    if len(chat.input_ids) <= max_len:
        return chat, False
    if parsed.fields is None:
        return None, True  # a pre-rendered chat has no article text we know how to shorten
    profile, title, article = parsed.fields
    article_ids = tokenizer.encode(article)
    keep = len(article_ids) - (len(chat.input_ids) - max_len)
    while keep > 0:
        shortened = tokenizer.decode(article_ids[:keep]).rstrip() + " ..."
        chat = tokenizer.encode_chat(scoring_messages(profile, title, shortened), parsed.completion)
        if len(chat.input_ids) <= max_len:
            return chat, True
        keep -= len(chat.input_ids) - max_len
    return None, True


def _why_empty(path, tokenizer: Tokenizer, records: list[ParsedRecord], max_len: int, skipped: Counter) -> str:
    if not records:
        skips = f" ({sum(skipped.values())} bad lines skipped)" if skipped else ""
        return f"{path}: no records{skips}"
    shortest = min(len(tokenizer.encode_chat(r.messages, r.completion).input_ids) for r in records)
    return (f"{path}: none of its {len(records)} examples fits max_len={max_len}, even with the article text "
            f"shortened; the shortest example is {shortest} tokens as written. Raise max_len or shorten the "
            "profiles, titles or reasoning.")


def contrastive_groups(examples: Sequence[Example], min_spread: float = 2.0) -> list[list[int]]:
    """Indices of examples sharing an article, scored for several profiles with a spread >= min_spread."""
    by_article: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        if example.article_id:
            by_article[example.article_id].append(index)
    groups = []
    for members in by_article.values():
        scores = [examples[i].score for i in members]
        if len({examples[i].profile_id for i in members}) >= 2 and max(scores) - min(scores) >= min_spread:
            groups.append(members)
    return groups


class ScoredDataset(torch.utils.data.Dataset):
    """Map-style dataset of tokenized examples: items are dicts with input_ids, labels, weight, band."""

    def __init__(self, examples: list[Example], bands: Sequence[Band] = DEFAULT_BANDS,
                 report: DatasetReport | None = None):
        self.examples, self.bands = examples, tuple(bands)
        self.report = report or build_report("<memory>", self.examples, self.bands)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: Tokenizer, max_len: int = 1024,
                   bands: Sequence[Band] = DEFAULT_BANDS, on_error: str = "raise") -> ScoredDataset:
        records, skipped = read_jsonl(path, on_error)
        examples, truncated, did_not_fit = [], 0, 0
        for number, parsed in records:
            try:
                band = band_index(parsed.score, bands)
            except ValueError as error:  # scores within 0-10 that custom bands leave out
                if on_error == "raise":
                    raise DataError(f"{path}:{number}: {error}") from None
                skipped["score falls in no band"] += 1
                continue
            chat, shortened = _fit_article(tokenizer, parsed, max_len)
            if chat is None:
                did_not_fit += 1
                continue
            truncated += shortened
            ids = torch.tensor(chat.input_ids, dtype=torch.long)
            labels = ids.clone()
            labels[: chat.prompt_length] = IGNORE_INDEX
            weight = bands[band].weight if parsed.weight is None else parsed.weight
            examples.append(Example(ids, labels, parsed.score, band, weight, parsed.profile_id, parsed.article_id,
                                    shortened))
        if not examples:
            raise DataError(_why_empty(path, tokenizer, [parsed for _, parsed in records], max_len, skipped))
        report = build_report(str(path), examples, bands, truncated, did_not_fit, dict(skipped))
        report.sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()  # checkpoints note what they trained on
        return cls(examples, bands, report)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Each example's token count (what packing lays out)."""
        return [len(e.input_ids) for e in self.examples]

    def __getitem__(self, index: int) -> dict:
        e = self.examples[index]
        return {"input_ids": e.input_ids, "labels": e.labels, "weight": e.weight, "band": e.band}

    @property
    def band_ids(self) -> list[int]:
        return [e.band for e in self.examples]

    def contrastive_boost(self, factor: float) -> list[float]:
        """Per-example sampling boost: `factor` for examples in a contrastive group, 1 for the rest."""
        boosted = {i for group in contrastive_groups(self.examples) for i in group}
        return [factor if i in boosted else 1.0 for i in range(len(self.examples))]


def build_report(source: str, examples: Sequence[Example], bands: Sequence[Band], truncated: int = 0,
                 did_not_fit: int = 0, skipped: dict | None = None) -> DatasetReport:
    counts = Counter(e.band for e in examples)
    total = max(len(examples), 1)
    lengths = np.array([len(e.input_ids) for e in examples] or [0])
    groups = contrastive_groups(examples)
    return DatasetReport(
        source=source,
        bands=[{"name": b.name, "low": b.low, "high": b.high, "weight": b.weight, "count": counts[i],
                "raw_pct": 100 * counts[i] / total, "target_pct": 100 * b.target_share}
               for i, b in enumerate(bands)],
        profiles=dict(Counter(e.profile_id for e in examples)),
        token_lengths={f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())},
        truncated=truncated, did_not_fit=did_not_fit, skipped_lines=dict(skipped or {}),
        contrastive_groups=len(groups), contrastive_examples=sum(len(g) for g in groups),
        length_histogram=length_histogram(lengths.tolist()),
    )


def length_histogram(lengths: Sequence[int], width: int = 128) -> dict[str, int]:
    """How many examples fall in each `width`-token span of lengths ("1-128": n, "129-256": n, ...), empty
    spans between included: the shape of the data that padding wastes and packing recovers."""
    counts = Counter((length - 1) // width for length in lengths if length > 0)
    return {f"{k * width + 1}-{(k + 1) * width}": counts[k] for k in range(max(counts, default=-1) + 1)}


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids (pad_id), labels (-100), per-example weights and true lengths."""
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        labels[row, : len(item["labels"])] = item["labels"]
    weights = torch.tensor([float(item["weight"]) for item in items], dtype=torch.float32)
    lengths = torch.tensor([len(item["input_ids"]) for item in items], dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "weight": weights, "lengths": lengths}


def read_training_data(config: TrainConfig) -> ScoredDataset:
    """config.train_data, tokenized with the tokenizer of the model folder config.model (no weights read)."""
    return ScoredDataset.from_jsonl(config.train_data, Tokenizer.from_pretrained(config.model), max_len=config.max_len)
