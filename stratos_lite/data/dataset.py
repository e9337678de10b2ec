"""Scored JSONL to weighted, completion-only training examples, with a dataset report.

Each validated record (records.py) is tokenized by the one ChatML builder; only the completion (its
<|im_end|> included) carries labels. An example longer than max_len has its article text shortened, never its
completion. The report counts what a person checks before training: the bands against their targets, the
profiles, token lengths, what was shortened or left out, the contrastive groups.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..model.tokenizer import Tokenizer
from ..storage.atomic import write_text
from .batch import IGNORE_INDEX
from .records import DataError, ParsedRecord, read_jsonl
from .task import DEFAULT_BANDS, Band, band_index, scoring_messages

if TYPE_CHECKING:  # for the annotation only: the settings module does not depend on the data
    from ..config import TrainConfig

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



@dataclass
class RunData:
    """What a run reads besides the weights: its model folder's tokenizer, the training set, and the held-out
    set when the run measures a held-out loss on it (eval_data with eval_every)."""
    tokenizer: Tokenizer
    train: ScoredDataset
    evaluation: ScoredDataset | None = None

    @classmethod
    def read(cls, config: TrainConfig, evaluation: bool = True) -> RunData:
        """config.train_data (and, with `evaluation`, config.eval_data when the run uses it), tokenized with the
        tokenizer of config.model, read once (no weights read)."""
        tokenizer = Tokenizer.from_pretrained(config.model)
        train = ScoredDataset.from_jsonl(config.train_data, tokenizer, max_len=config.max_len)
        held_out = (ScoredDataset.from_jsonl(config.eval_data, tokenizer, max_len=config.max_len)
                    if evaluation and config.eval_data and config.eval_every else None)
        return cls(tokenizer, train, held_out)
