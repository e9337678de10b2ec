"""The whole pipeline on the embedded demo, the report's phases scaled down to a CPU and a few minutes:

data -> the profile-blind base (the report's V1: a small Qwen3 fully fine-tuned on profile-blind labels,
shipped in stratos_lite/demo/shipped_base/, or trained here with vendored_base = false; base.py) -> DoRA
phase (the report's recipe: band sampling, loss weights, accumulation, cosine, clipping, checkpoints) ->
q8_0 and q4_k_m GGUFs (exported from the unmerged model; with mode "lora" also the adapter as a llama.cpp
adapter GGUF over the base's q8_0) -> evaluation with the adapters off and on, and of each GGUF in llama.cpp
when it is installed, with the smallest file that scores as the model does chosen for the Modelfile -> merged
HF folder.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import time
from pathlib import Path

import torch

from ..config import ADAPTER_NAMES
from ..data.dataset import ScoredDataset
from ..data.task import SYSTEM_PROMPT
from ..evaluation.evaluate import evaluate
from ..export.gguf_file import export_gguf, export_gguf_from_folder
from ..export.imatrix import compute_imatrix
from ..export.lora_gguf import export_lora_gguf
from ..export.modelfile import write_modelfile
from ..export.quant_choice import SPEARMAN_TOLERANCE, quant_files, smallest_within
from ..model.folders import load_pretrained_with_adapter, save_pretrained
from ..model.lora import adapters_disabled, merge_adapters, summarize
from ..model.tokenizer import Tokenizer
from ..storage.atomic import write_text
from ..train.builder import prepare_model
from ..train.trainer import Trainer
from .base import VENDORED_BASE, load_vendored_base, train_base
from .config import DemoConfig, phase_config
from .data import make_demo_data


def run_demo(config: DemoConfig | None = None, reuse: bool = False) -> dict:
    """Run every phase; returns the timings, metrics and output paths (also written to summary.json)."""
    config = config or DemoConfig()
    out = Path(config.out_dir)
    if out.exists() and not reuse:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = time.perf_counter() - clock
        clock = time.perf_counter()
        print(f"== {name} done in {timings[name]:.1f} s", flush=True)

    # The shipped base (its settings checked before any work) and its tokenizer, which every seed's data shares.
    model, shipped_tokenizer = load_vendored_base(config) if config.vendored_base else (None, None)
    paths = make_demo_data(out / "data", seed=config.seed, tokenizer=shipped_tokenizer, **config.data)
    tokenizer = Tokenizer.from_pretrained(paths["tokenizer"])
    dora_cfg = phase_config(config, "dora", model=str(out / "base_model"))  # the base folder written below
    train_data = ScoredDataset.from_jsonl(paths["train"], tokenizer, max_len=dora_cfg.max_len)
    train_data.report.write(out)
    lap("data")

    if model is None:
        model, _ = train_base(config, paths, tokenizer)
    else:
        print(f"base: the profile-blind base shipped in {VENDORED_BASE} (the report's V1, made once by "
              "tools/make_demo_base.py; vendored_base = false trains it here)")
    save_pretrained(model, tokenizer, out / "base_model", dtype=torch.float32)
    lap("base phase")

    # The DoRA phase trains on the base folder just written, prepared as any run's model is (train/builder.py):
    # the frozen base in the compute dtype (bf16 where native: the report's setup), adapters in fp32; on the CPU,
    # where the demo's recipe was measured.
    model = prepare_model(dora_cfg, torch.device("cpu"))
    print(summarize(model))
    result = Trainer(model, train_data, dora_cfg, pad_id=tokenizer.pad_id).train()
    lap(f"{ADAPTER_NAMES[dora_cfg.mode]} phase")

    model.eval()
    # Exported from the unmerged model (DoRA is merged block by block on the way out), so that the
    # evaluation can still switch the adapters off, and can score the shipped files beside the model. A 4-bit
    # base (base_quant "nf4") is not what ships: the adapter goes into the base folder's own weights.
    shipping = model if dora_cfg.base_quant == "none" else load_pretrained_with_adapter(
        out / "base_model", out / "dora" / "adapter", dtype=model.model.embed_tokens.weight.dtype)[0]
    ggufs = export_quants(shipping, tokenizer, out, config, paths["train"], dora_cfg.max_len, lap)
    write_modelfile(ggufs[0], SYSTEM_PROMPT)  # the served-prompt checks read it; it follows the choice below
    pairs = [ship_lora_adapter(model, out, config.export["quants"][0])] if dora_cfg.mode == "lora" else []
    lap("GGUF export")

    settings = dict(batch_size=config.eval["batch_size"], max_new_tokens=config.eval["max_new_tokens"])
    with adapters_disabled(model):
        before = evaluate(model, tokenizer, paths["eval"], out / "eval_before", compare_adapters_off=False,
                          spread_articles=config.eval["spread_articles"], **settings)
    in_llama_cpp = importlib.util.find_spec("llama_cpp") is not None  # llama.cpp is an optional extra
    after = evaluate(model, tokenizer, paths["eval"], out / "eval", baseline=out / "eval_before" / "predictions.jsonl",
                     spread_articles=config.eval["spread_articles"], labels=("adapters off", "adapters on"),
                     gguf=ggufs if in_llama_cpp else [], gguf_lora=pairs if in_llama_cpp else [], **settings)
    choice = smallest_within(after)
    gguf_path = choice.path if choice else ggufs[0]
    write_modelfile(gguf_path, SYSTEM_PROMPT)
    lap("evaluation")

    merge_adapters(shipping)
    save_pretrained(shipping, tokenizer, out / "merged")
    lap("merge")

    summary = {"timings_s": timings, "total_s": sum(timings.values()), "train_steps": result.steps,
               "final_loss": result.final_loss, "mean_training_score": _mean_score(train_data),
               "before": _headline(before), "after": _headline(after),
               "gguf": {_column(name, row): _headline(row) for name, row in after.get("engines", {}).items()},
               "paths": {"data": str(out / "data"), "base_model": str(out / "base_model"),
                         "dora_run": str(out / "dora"), "adapter": str(out / "dora" / "adapter"),
                         "eval_report": str(out / "eval" / "eval_report.md"), "merged": str(out / "merged"),
                         "gguf": str(gguf_path), "modelfile": str(gguf_path.with_name("Modelfile"))},
               "chosen_gguf": choice.name if choice else None}
    summary["constant_mae"] = _constant_mae(paths["eval"], summary["mean_training_score"])
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(format_summary(summary))
    return summary


def export_quants(shipping, tokenizer, out: Path, config: DemoConfig, train_path: Path, max_len: int,
                  lap) -> list[Path]:
    """Each of [export] quants as out/scorer-QUANT.gguf; with imatrix_records, the importance matrix of that
    many training records (out/imatrix.gguf) and each K-quant also written with it (scorer-QUANT-imatrix.gguf)."""
    records = config.export.get("imatrix_records", 0)
    matrix = None
    if records:
        matrix = compute_imatrix(shipping, tokenizer, [train_path], max_len=max_len, limit=records, batch_size=16)
        matrix.save(out / "imatrix.gguf")
        lap("importance matrix")
    files = quant_files(out / "scorer.gguf", config.export["quants"], matrix is not None, also_without=True)
    for quant, path, with_matrix in files:
        export_gguf(shipping, tokenizer, path, quant=quant, name="stratos-demo-scorer", modelfile=False,
                    imatrix=matrix if with_matrix else None)
    return [path for _, path, _ in files]


def ship_lora_adapter(model, out: Path, quant: str) -> tuple[Path, Path]:
    """A LoRA run ships as an adapter too: the base folder's GGUF once (out/base-QUANT.gguf) and the adapter
    over it (out/lora/adapter-f16.gguf, with a Modelfile saying FROM the base and ADAPTER the adapter)."""
    base = export_gguf_from_folder(out / "base_model", out / f"base-{quant}.gguf", quant=quant, modelfile=False)
    return base, export_lora_gguf(model, out / "lora" / "adapter-f16.gguf", base, system_prompt=SYSTEM_PROMPT)


def _column(name: str, engine: dict) -> str:
    """A GGUF's column in the summary: its file name, or for a base with an adapter over it, what it is."""
    return f"{Path(engine['file']).stem.removeprefix('base-')} + adapter" if "lora" in engine else name


def _headline(result: dict) -> dict:
    keys = ("direction_accuracy", "mae", "spearman", "psr", "think_empty_rate", "parse_failures", "examples",
            "examples_per_s")
    spreads = result.get("spread_check", [])
    headline = {k: result[k] for k in keys}
    if "file" in result:  # a base with an adapter over it: what each variant adds is the adapter file
        headline["size_mb"] = Path(result.get("lora", result["file"])).stat().st_size / 1e6
    if "kl_divergence" in result:
        headline["kl_divergence"] = result["kl_divergence"]
    if "agreement" in result:
        headline["agreement_within_0_5"] = result["agreement"]["within_0_5"]
        headline["prompt_checks_failed"] = sum(not c["ok"] for c in result["prompt_checks"])
    if spreads:
        headline["truth_spread"] = sum(r["truth_spread"] for r in spreads) / len(spreads)
        headline["predicted_spread"] = sum(r["model_spread"] for r in spreads) / len(spreads)
        if "adapters_off_spread" in spreads[0]:
            headline["adapters_off_spread"] = sum(r["adapters_off_spread"] for r in spreads) / len(spreads)
    return headline


def _mean_score(dataset: ScoredDataset) -> float:
    return sum(e.score for e in dataset.examples) / len(dataset.examples)


def _constant_mae(eval_path: Path, constant: float) -> float:
    """The MAE of always answering the training mean: the bar a model that learned nothing clears."""
    scores = [json.loads(line)["score"] for line in eval_path.read_text().splitlines() if line.strip()]
    return sum(abs(s - constant) for s in scores) / len(scores)


def format_summary(summary: dict) -> str:
    def cell(value, percent=False):
        if value is None:
            return "n/a"
        if percent:
            return f"{100 * value:.1f}%"
        if isinstance(value, float):  # a divergence far below 0.001 keeps three significant digits
            return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
        return str(value)

    after = summary["after"]
    columns = {"adapters off": summary["before"], "adapters on": after, **summary.get("gguf", {})}
    rows = [("direction accuracy", "direction_accuracy", True), ("MAE", "mae", False),
            ("Spearman rho", "spearman", False), ("PSR", "psr", True), ("think empty", "think_empty_rate", True),
            ("parse failures", "parse_failures", False), ("examples/s", "examples_per_s", False),
            ("file MB", "size_mb", False),
            ("agrees with torch", "agreement_within_0_5", True), ("next-token KL", "kl_divergence", False),
            ("served prompt errors", "prompt_checks_failed", False)]
    column = max(20, *(len(name) + 2 for name in columns))
    width = 22 + column * len(columns)
    lines = ["", f"{'metric':<22}" + "".join(f"{name:>{column}}" for name in columns), "-" * width]
    lines += [f"{name:<22}" + "".join(f"{cell(c.get(key), pct):>{column}}" for c in columns.values())
              for name, key, pct in rows]
    if "truth_spread" in after:
        lines.append(f"{'spread (truth ' + format(after['truth_spread'], '.2f') + ')':<22}"
                     f"{cell(after.get('adapters_off_spread')):>{column}}{cell(after['predicted_spread']):>{column}}")
    if summary.get("gguf"):
        chosen = summary.get("chosen_gguf")
        lines.append(f"smallest GGUF within {SPEARMAN_TOLERANCE} Spearman of the torch model, no new parse failures: "
                     f"{chosen or 'none'} (the Modelfile's)")
    lines += ["-" * width, f"MAE of always answering the training mean ({summary['mean_training_score']:.2f}): "
              f"{summary['constant_mae']:.3f}",
              "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items())
              + f"; total {summary['total_s']:.0f} s", "", "outputs:"]
    lines += [f"  {name:<12}{path}" for name, path in summary["paths"].items()]
    return "\n".join([*lines, "", *next_steps(summary["paths"])])


def next_steps(paths: dict[str, str]) -> list[str]:
    """What a person would do next with what the demo made: score a text, read the report, serve the GGUF."""
    gguf = Path(paths["gguf"])
    held_out = json.loads((Path(paths["data"]) / "eval.jsonl").read_text().splitlines()[0])  # one it never saw
    quoted = {key: shlex.quote(held_out[key]) for key in ("profile", "title", "article")}
    return [
        f"made: an adapter on a small Qwen3, a merged model folder, and GGUF files with an Ollama Modelfile "
        f"({gguf.name}).",
        "next:",
        f"  stratos-lite score --model {paths['merged']} --dtype float32 --profile {quoted['profile']} "
        f"--title {quoted['title']} --article {quoted['article']}",
        f"  less {paths['eval_report']}",
        f"  cd {gguf.parent} && ollama create stratos-demo -f Modelfile && ollama run stratos-demo",
    ]
