"""Generation-based evaluation: the torch model (and each exported GGUF, in llama.cpp) completes the eval
set's prompts greedily; their scores are read back (data/task.py), measured as the report's section 6 does
(metrics.py) and written as predictions, metrics.json and eval_report.md (report.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..data.records import ParsedRecord
from ..model.lora import adapters_disabled
from ..storage.atomic import write_text
from ..train.metrics_log import log_generation_metrics
from .divergence import next_token_kl
from .engines import LlamaCppEngine, TorchEngine, gguf_column
from .metrics import agreement, metrics, spread_check
from .predictions import Prediction, load_eval_records, predict, read_predictions, write_predictions
from .report import bands_markdown, engines_markdown, report_markdown, write_charts
from .serving import served_prompt_checks


def evaluate_gguf(path: str | Path, tokenizer, records: Sequence[ParsedRecord], reference: Sequence[Prediction],
                  out_dir: Path, max_new_tokens: int = 160, threshold: float = 5.0, progress: bool = True,
                  lora: str | Path | None = None, model=None, **engine_options) -> tuple[dict, list[Prediction]]:
    """The same records through llama.cpp (the file `path`, with the LoRA adapter file `lora` over it when
    given): its predictions (also written to predictions_<file stem>[+<adapter stem>].jsonl) and their metrics,
    throughput, agreement with `reference` (the torch model's predictions) and the served-prompt checks (of
    the Modelfile beside the adapter, or beside the file); with `model` (the torch model), the file's mean
    next-token KL divergence from it over the records' completions (divergence.py)."""
    path = Path(path)
    engine = LlamaCppEngine(path, lora=lora, **engine_options)
    try:
        modelfile = Path(lora or path).with_name("Modelfile")
        checks = served_prompt_checks(engine.llm, tokenizer, records[0].messages,
                                      modelfile if modelfile.is_file() else None)
        predictions, rate = predict(engine, tokenizer, records, max_new_tokens, progress)
    finally:
        engine.close()
    write_predictions(predictions, out_dir / f"predictions_{path.stem}{'+' + Path(lora).stem if lora else ''}.jsonl")
    summary = {**metrics(predictions, threshold), "examples_per_s": rate, "file": str(path),
               **({"lora": str(lora)} if lora else {}),
               "agreement": agreement(predictions, reference), "prompt_checks": [c.to_dict() for c in checks]}
    if model is not None:
        summary["kl_divergence"] = next_token_kl(model, tokenizer, records, path, lora,
                                                 engine_options.get("n_gpu_layers"))
    return summary, predictions


def evaluate(model, tokenizer, eval_path: str | Path, out_dir: str | Path, *, baseline: str | Path | None = None,
             compare_adapters_off: bool = True, spread_articles: int = 5, threshold: float = 5.0,
             batch_size: int = 16, max_new_tokens: int = 160, limit: int = 0, progress: bool = True,
             labels: tuple[str, str] = ("baseline", "model"), gguf: Sequence[str | Path] = (),
             gguf_lora: Sequence[tuple[str | Path, str | Path]] = (), gguf_options: dict | None = None,
             tensorboard: str | Path | None = None, step: int = 0) -> dict:
    """Evaluate `model` on an eval JSONL; write predictions.jsonl, metrics.json and eval_report.md.

    compare_adapters_off: also score the profile-awareness articles with the adapters disabled (the base
    model), side by side. baseline: a predictions.jsonl of another model for a two-column report, whose
    columns are headed by `labels` (baseline, this model). gguf: exported files to run through llama.cpp
    on the same prompts, each a column of the report beside the torch model, with its agreement and the
    check of the prompts servers will build from it (`gguf_options` go to LlamaCppEngine). gguf_lora: (base
    GGUF, LoRA adapter GGUF) pairs, each scored as one more such column, the adapter applied at load time as
    llama.cpp and Ollama serve it. tensorboard: a
    folder (a run's out_dir/tensorboard) to add every column's metrics to as scalars at `step`.

    Returns the metrics of the model (the dict written to metrics.json), with the GGUF columns under
    "engines"; see `metrics` for what each holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_eval_records(eval_path, limit)
    predictions, rate = predict(TorchEngine(model, tokenizer.pad_id, batch_size), tokenizer, records, max_new_tokens,
                                progress)
    write_predictions(predictions, out / "predictions.jsonl")
    result = metrics(predictions, threshold)
    result["examples_per_s"] = rate
    columns = {labels[1]: predictions}
    engines: dict[str, dict] = {}
    for path, lora in [*((path, None) for path in gguf), *gguf_lora]:
        name = gguf_column(path, lora)
        engines[name], columns[name] = evaluate_gguf(path, tokenizer, records, predictions, out, max_new_tokens,
                                                     threshold, progress, lora, model, **(gguf_options or {}))
    charts = write_charts(out, columns)
    others: dict[str, Sequence[Prediction]] = {}
    baseline_metrics = None
    if baseline:
        base_predictions = read_predictions(baseline)
        baseline_metrics = metrics(base_predictions, threshold)
        others["baseline"] = base_predictions
    chosen = spread_check(predictions, {}, spread_articles)
    if compare_adapters_off and chosen:
        others["adapters_off"] = _adapters_off_column(model, tokenizer, records, predictions, chosen, out,
                                                      batch_size, max_new_tokens, progress)
    spreads = spread_check(predictions, others, spread_articles)
    result["spread_check"] = spreads
    if baseline_metrics:
        result["baseline"] = {k: v for k, v in baseline_metrics.items() if k != "per_profile"}
    if engines:
        result["engines"] = engines
    write_text(out / "metrics.json", json.dumps(result, indent=2))
    report = report_markdown(result, spreads, baseline_metrics, labels) + engines_markdown(labels[1], result, engines)
    write_text(out / "eval_report.md", report + bands_markdown(charts, {labels[1]: result, **engines}))
    if tensorboard is not None:
        log_generation_metrics(tensorboard, step, {labels[1]: result, **engines})
    return result


def _adapters_off_column(model, tokenizer, records, predictions, chosen, out: Path, batch_size: int,
                         max_new_tokens: int, progress: bool) -> list[Prediction]:
    """The base model's predictions (adapters bypassed) on the profile-awareness articles `chosen`, written
    to predictions_adapters_off.jsonl; every other example stands as "not scored"."""
    articles = {row["article"] for row in chosen}
    subset = [i for i, p in enumerate(predictions) if p.article in articles]
    with adapters_disabled(model):
        off, _ = predict(TorchEngine(model, tokenizer.pad_id, batch_size, name="adapters off"), tokenizer,
                         [records[i] for i in subset], max_new_tokens, progress)
    write_predictions(off, out / "predictions_adapters_off.jsonl")
    by_index = dict(zip(subset, off, strict=True))
    return [by_index.get(i, Prediction(i, p.profile, p.article, p.title, p.truth, None, 0, "not scored", True, ""))
            for i, p in enumerate(predictions)]
