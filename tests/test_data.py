"""Scored records to completion-only examples; bands; bad lines named by file and line; demo data."""

import json

import pytest
import torch

from stratos_lite.data.batch import IGNORE_INDEX, collate
from stratos_lite.data.dataset import ScoredDataset
from stratos_lite.data.records import DataError
from stratos_lite.data.task import DEFAULT_BANDS, band_index, score_text, scoring_messages
from stratos_lite.demo.data import PROFILES, make_demo_data, make_records, relevance
from stratos_lite.model.tokenizer import Tokenizer

RECORD = {"profile_id": "geo", "profile": "Senior geophysicist, KOC Kuwait. Field: energy.", "article_id": "a1",
          "title": "Kuwait oil output rises", "article": "Sector: energy. Country: Kuwait. Oil output rose.",
          "score": 7.5, "reasoning": "Field match and same country."}


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_labels_cover_exactly_the_completion(tmp_path, tokenizer):
    ds = ScoredDataset.from_jsonl(write(tmp_path, [RECORD]), tokenizer)
    item = ds[0]
    prompt_ids = tokenizer.encode_prompt(scoring_messages(RECORD["profile"], RECORD["title"], RECORD["article"]))
    n = len(prompt_ids)
    assert item["input_ids"][:n].tolist() == prompt_ids  # training prefix == inference prompt, token for token
    assert (item["labels"][:n] == IGNORE_INDEX).all()
    assert torch.equal(item["labels"][n:], item["input_ids"][n:])
    assert item["labels"][-1].item() == tokenizer.im_end_id
    completion = tokenizer.decode(item["input_ids"][n:].tolist())
    assert completion == '<think>\nField match and same country.\n</think>\n\n{"score": 7.5}<|im_end|>'
    assert item["weight"] == 2.0 and item["band"] == 3


def test_pre_rendered_messages(tmp_path, tokenizer):
    row = {"messages": [{"role": "system", "content": "Score it."}, {"role": "user", "content": "Oil in Kuwait"},
                        {"role": "assistant", "content": '<think>\nx\n</think>\n\n{"score": 1}'}], "score": 1}
    item = ScoredDataset.from_jsonl(write(tmp_path, [row]), tokenizer)[0]
    labelled = item["input_ids"][item["labels"] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labelled) == '<think>\nx\n</think>\n\n{"score": 1}<|im_end|>'
    assert item["band"] == 0 and item["weight"] == 0.5


@pytest.mark.parametrize(("score", "band"), [(0, 0), (1.99, 0), (2, 1), (7.99, 3), (8, 4), (10, 4)])
def test_band_edges(score, band):
    assert band_index(score) == band
    assert DEFAULT_BANDS[band_index(score)].weight == [0.5, 1.0, 1.5, 2.0, 3.0][band]


def test_long_article_is_shortened_never_the_completion(tmp_path, tokenizer):
    long = dict(RECORD, article="Sector: energy. " + "Oil output in Kuwait rose again this year. " * 60)
    ds = ScoredDataset.from_jsonl(write(tmp_path, [long, RECORD]), tokenizer, max_len=400)
    assert len(ds) == 2 and ds.report.truncated == 1
    item = ds[0]
    assert len(item["input_ids"]) <= 400
    labelled = item["input_ids"][item["labels"] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labelled).startswith("<think>\nField match and same country.")
    assert "..." in tokenizer.decode(item["input_ids"].tolist())


def test_what_cannot_fit_is_counted_not_silently_dropped(tmp_path, tokenizer):
    huge = dict(RECORD, reasoning="Long thought. " * 200)
    ds = ScoredDataset.from_jsonl(write(tmp_path, [huge, RECORD]), tokenizer, max_len=350)
    assert len(ds) == 1 and ds.report.did_not_fit == 1
    assert "could not fit even so (left out): 1" in ds.report.to_markdown()


@pytest.mark.parametrize(("line", "message"), [
    ('{"profile_id": "geo",', "malformed JSON"),
    (json.dumps({k: v for k, v in RECORD.items() if k != "title"}), "missing field 'title'"),
    (json.dumps(dict(RECORD, score=11)), "score 11 is outside 0-10"),
    (json.dumps(dict(RECORD, score="high")), "score must be a number"),
    (json.dumps(dict(RECORD, reasoning="  ")), "field 'reasoning' is blank"),
    (json.dumps(dict(RECORD, article=" \n\t ")), "field 'article' is blank"),
    (json.dumps(dict(RECORD, profile="")), "field 'profile' is blank"),
    (json.dumps(dict(RECORD, title="   ")), "field 'title' is blank"),
    (json.dumps(dict(RECORD, profile=42)), "field 'profile' must be a string: got int 42"),
    (json.dumps(dict(RECORD, article=["a", "b"])), r"field 'article' must be a string: got list \['a', 'b'\]"),
    (json.dumps(dict(RECORD, title={"text": "x"})), "field 'title' must be a string: got dict"),
    (json.dumps(dict(RECORD, reasoning=True)), "field 'reasoning' must be a string: got bool True"),
    (json.dumps(dict(RECORD, profile_id=7)), "field 'profile_id' must be a string: got int 7"),
    (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}],
                 "score": 1}), "field 'content' must be a string"),
    (json.dumps({"messages": ["hello", {"role": "assistant", "content": "y"}], "score": 1}),
     "each message must be an object with a role and a content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
                 "score": 1}), "empty completion"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
                 "score": 1}), "unknown role 'tool'"),
])
def test_bad_lines_name_file_and_line(tmp_path, tokenizer, line, message):
    path = write(tmp_path, [RECORD, line, RECORD])
    with pytest.raises(DataError, match=f"{path}:2: {message}"):
        ScoredDataset.from_jsonl(path, tokenizer)


def test_skip_mode_counts_bad_lines(tmp_path, tokenizer):
    rows = [RECORD, "{oops", json.dumps(dict(RECORD, score=-1)), dict(RECORD, profile=42), dict(RECORD, article=" "),
            dict(RECORD, article=3.5), RECORD]
    ds = ScoredDataset.from_jsonl(write(tmp_path, rows), tokenizer, on_error="skip")
    assert len(ds) == 2
    assert ds.report.skipped_lines == {"malformed JSON": 1, "score -1 is outside 0-10": 1,
                                       "field 'profile' must be a string": 1, "field 'article' is blank": 1,
                                       "field 'article' must be a string": 1}


def test_dataset_where_nothing_fits_stops_with_counts_and_lengths(tmp_path, tokenizer):
    rows = [dict(RECORD, reasoning="Long thought. " * 100), dict(RECORD, profile="Engineer. " * 150)]
    path = write(tmp_path, rows)
    shortest = min(len(ScoredDataset.from_jsonl(write(tmp_path, [r], f"{i}.jsonl"), tokenizer, max_len=4096)[0]
                       ["input_ids"]) for i, r in enumerate(rows))
    with pytest.raises(DataError, match=rf"{path}: none of its 2 examples fits max_len=200, even with the article "
                                        rf"text shortened; the shortest example is {shortest} tokens as written"):
        ScoredDataset.from_jsonl(path, tokenizer, max_len=200)


def test_file_with_no_usable_record_stops(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"no records \(2 bad lines skipped\)"):
        ScoredDataset.from_jsonl(write(tmp_path, ["{oops", "[1]"]), tokenizer, on_error="skip")


def test_report_counts_bands_and_contrastive_groups(tmp_path, tokenizer):
    rows = [dict(RECORD, profile_id="a", score=0), dict(RECORD, profile_id="b", score=8),
            dict(RECORD, article_id="a2", profile_id="a", score=1), dict(RECORD, article_id="a2", profile_id="b",
                                                                          score=2)]
    report = ScoredDataset.from_jsonl(write(tmp_path, rows), tokenizer).report
    assert [b["count"] for b in report.bands] == [2, 1, 0, 0, 1]
    assert report.contrastive_groups == 1 and report.contrastive_examples == 2
    assert report.profiles == {"a": 2, "b": 2}


def test_collate_pads_right():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "weight": 2.0},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "weight": 0.5}]
    batch = collate(items, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch.weight.tolist() == [2.0, 0.5]
    assert batch.lengths.tolist() == [3, 1]


def test_demo_rule_and_data_are_deterministic(tmp_path):
    assert make_records(20, 5, seed=3) == make_records(20, 5, seed=3)
    geo = next(p for p in PROFILES if p.id == "geophysicist-koc")
    records = make_records(400, 5, seed=0)
    scores = [r["score"] for r in records]
    assert max(scores) >= 8 and sum(s < 2 for s in scores) / len(scores) > 0.7
    from stratos_lite.demo.data import Article

    oil_kuwait = Article("x", "energy", "oil", "Kuwait", "t", "x")
    assert relevance(geo, oil_kuwait)[0] == 10.0
    assert relevance(geo, Article("y", "gaming", "indie games", "Germany", "t", "x"))[0] == 0.0
    # The reasoning ends with the rule's total, written as the answer writes the score (the base phase's
    # profile-blind answers alone would never teach the higher scores).
    assert relevance(geo, oil_kuwait)[1].endswith(" same. Total 10.0.")
    assert all(r["reasoning"].endswith(f"Total {score_text(r['score'])}.") for r in records)
    paths = make_demo_data(tmp_path, train_articles=20, eval_articles=4)
    train_ids = {json.loads(line)["article_id"] for line in paths["train"].read_text().splitlines()}
    eval_ids = {json.loads(line)["article_id"] for line in paths["eval"].read_text().splitlines()}
    assert train_ids and eval_ids and not train_ids & eval_ids
    # Trained on the chats as the model reads them: the role names are whole tokens.
    demo_tokenizer = Tokenizer.from_pretrained(paths["tokenizer"])
    assert len(demo_tokenizer.encode("<|im_start|>assistant\n")) == 3


def test_contrastive_boost_raises_group_examples_within_their_band(tmp_path, tokenizer):
    from stratos_lite.data.sampler import example_probabilities

    rows = [dict(RECORD, profile_id="a", score=0), dict(RECORD, profile_id="b", score=9),  # group a1: spread 9
            dict(RECORD, article_id="a2", profile_id="a", score=0), dict(RECORD, article_id="a3", score=9)]
    ds = ScoredDataset.from_jsonl(write(tmp_path, rows), tokenizer)
    boost = ds.contrastive_boost(3.0)
    assert boost == [3.0, 3.0, 1.0, 1.0]
    shares = [b.target_share for b in DEFAULT_BANDS]
    p = example_probabilities(ds.band_ids, shares, boost)
    assert p[0] == pytest.approx(3 * p[2])  # same band (noise), boosted three to one
    assert (p[0] + p[2]).item() == pytest.approx(0.75 / (0.75 + 0.034))  # the band's share is unchanged
