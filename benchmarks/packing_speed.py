"""Padded against packed training on scored records of realistic lengths, with HF Trainer + PEFT (padded,
the report's stack) in the same run.

    python benchmarks/packing_speed.py                         # Qwen3-0.6B's shape, bf16, DoRA r16, 2 x 8
    python benchmarks/packing_speed.py --shape small --steps 4 # a quick look
    python benchmarks/packing_speed.py --profile               # where one packed row's time goes

The lengths. The report's training set is 18,502 records in 28 MB: about 1,500 bytes a record, most of it
the article. Around 4 bytes a token, plus the 47-token system prompt, the ChatML scaffolding, the profile and
a short reasoning, that is a few hundred tokens an example, with long articles running into max_len = 1024.
Sizes of texts are classically log-normal (a multiplicative spread), so the target length of each example is
drawn from a log-normal with median 330 tokens and sigma 0.45 (mean ~365, 99th percentile ~940), clipped to
[120, 1024]; the demo's scored records are lengthened with filler prose to reach it and tokenized with
Qwen3's real tokenizer (vendored for the tests) by the library's own prompt builder.

Each system trains `--steps` optimizer steps of batch 2 x accumulation 8 in its own process (gradient
checkpointing per layer, bf16, band sampling off, the same draws); the median step after the first is
reported, with real tokens/s, and peak memory (CPU: peak RSS growth; GPU: peak allocated). The padding
bound is padded tokens / real tokens of the steps run: what removing padding can buy at most.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from step_speed import SHAPES, device, device_name, hf_arguments, hf_step_timer, rss
from timing import step_records

ROOT = Path(__file__).resolve().parent.parent
BATCH, ACCUM, RANK, ALPHA, DROPOUT = 2, 8, 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEDIAN_TOKENS, SIGMA, SHORTEST, MAX_LEN = 330, 0.45, 120, 1024
FILLER = ("The ministry published the figures on Tuesday, and analysts in the region expect the numbers to "
          "move again before the end of the quarter, when the next survey is due. ")


def qwen3_tokenizer(folder: Path):
    import stratos_lite as sl

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes(gzip.decompress((ROOT / "tests/data/qwen3" / f"{name}.gz").read_bytes()))
    return sl.Tokenizer.from_pretrained(folder)


def write_records(path: Path, tokenizer, count: int, seed: int = 0) -> None:
    """`count` scored records whose tokenized lengths follow the log-normal above."""
    from stratos_lite.data.task import scoring_messages
    from stratos_lite.demo.data import make_records, write_jsonl

    generator = torch.Generator().manual_seed(seed)
    targets = (torch.randn(count, generator=generator, dtype=torch.float64) * SIGMA + math.log(MEDIAN_TOKENS)).exp()
    filler_tokens = len(tokenizer.encode(FILLER))
    records = make_records(math.ceil(count / 5), 5, seed=seed)[:count]
    for record, target in zip(records, targets.clamp(SHORTEST, MAX_LEN).tolist(), strict=True):
        used = len(tokenizer.encode_chat(scoring_messages(record["profile"], record["title"], record["article"]),
                                         record["reasoning"]).input_ids)
        words = FILLER.split()
        extra = max(0, round(target) - used)
        record["article"] += " " + FILLER * (extra // filler_tokens) + " ".join(words[: extra % filler_tokens])
    write_jsonl(records, path)


def draws(dataset, steps: int) -> list[int]:
    """The examples the trainer draws in `steps` steps (uniform sampling, seed 0), in order."""
    import stratos_lite as sl
    from stratos_lite.data.sampler import sampler_for

    config = sl.TrainConfig(batch_size=BATCH, grad_accum=ACCUM, band_sampling=False)
    draw = iter(sampler_for(dataset, config))
    return [next(draw) for _ in range(steps * BATCH * ACCUM)]


def step_tokens(dataset, steps: int) -> tuple[int, int]:
    """(real, padded) tokens of the run's first `steps` steps: the same draws the trainer makes."""
    lengths = [dataset.lengths[i] for i in draws(dataset, steps)]
    micro = [lengths[start:start + BATCH] for start in range(0, len(lengths), BATCH)]
    return sum(lengths), sum(max(m) * len(m) for m in micro)


def run_ours(shape: dict, data: Path, tokenizer_dir: Path, steps: int, packing: bool, out_dir: str) -> dict:
    import stratos_lite as sl

    torch.manual_seed(0)
    model = sl.Qwen3ForCausalLM(sl.Qwen3Config(**shape)).to(device(), torch.bfloat16)
    sl.apply_dora(model, RANK, ALPHA, DROPOUT, TARGETS)
    dataset = sl.ScoredDataset.from_jsonl(data, sl.Tokenizer.from_pretrained(tokenizer_dir), max_len=MAX_LEN)
    config = sl.TrainConfig(out_dir=out_dir, batch_size=BATCH, grad_accum=ACCUM, lr=1e-5, max_steps=steps,
                            dtype="bfloat16", gradient_checkpointing=True, band_sampling=False, verify_batches=0,
                            save_every=10**9, progress=False, packing=packing, max_len=MAX_LEN)
    sl.Trainer(model, dataset, config).train()
    metrics = step_records(config.out_dir)
    real, padded = step_tokens(dataset, steps)
    return {"times": [m["step_seconds"] for m in metrics], "tokens": [m["tokens"] for m in metrics],
            "real": real, "padded": padded}


def run_hf(shape: dict, data: Path, tokenizer_dir: Path, steps: int, packing: bool, out_dir: str) -> dict:
    del packing  # the report's stack pads each micro-batch
    import transformers
    from peft import LoraConfig, get_peft_model

    import stratos_lite as sl

    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape)).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, use_dora=True,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    tokenizer = sl.Tokenizer.from_pretrained(tokenizer_dir)
    dataset = sl.ScoredDataset.from_jsonl(data, tokenizer, max_len=MAX_LEN)
    # The same examples in the same order as ours: HF's own sampler shuffles, so it is replaced by one that
    # reads the rows as given.
    rows = [{"input_ids": dataset.examples[i].input_ids, "labels": dataset.examples[i].labels}
            for i in draws(dataset, steps)]
    times: list[float] = []

    def collate(items):
        batch = sl.collate([{**item, "weight": 1.0} for item in items], tokenizer.pad_id)
        mask = torch.arange(batch["input_ids"].shape[1])[None] < batch["lengths"][:, None]
        return {"input_ids": batch["input_ids"], "labels": batch["labels"], "attention_mask": mask.long()}

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    InOrder(model=model, args=hf_arguments(out_dir, steps, torch.bfloat16, BATCH, ACCUM), train_dataset=rows,
            data_collator=collate, callbacks=[hf_step_timer(times)]).train()
    return {"times": times}


def child(system: str, shape_name: str, data: Path, tokenizer_dir: Path, steps: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = rss()
    runner = run_hf if system == "hf" else run_ours
    import stratos_lite as sl

    vocab = max(SHAPES[shape_name]["vocab_size"], sl.Tokenizer.from_pretrained(tokenizer_dir).vocab_size)
    with tempfile.TemporaryDirectory() as out_dir:
        result = runner({**SHAPES[shape_name], "vocab_size": vocab}, data, tokenizer_dir, steps, system == "packed",
                        out_dir)
    result["peak"] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--child", choices=["padded", "packed", "hf"])
    parser.add_argument("--data")
    parser.add_argument("--tokenizer")
    parser.add_argument("--profile", action="store_true", help="profile one packed row's forward and backward")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.shape, Path(args.data), Path(args.tokenizer), args.steps)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tokenizer = qwen3_tokenizer(work)
        write_records(work / "train.jsonl", tokenizer, args.records)
        (profile_row if args.profile else report)(args, work, tokenizer)


def profile_row(args: argparse.Namespace, work: Path, tokenizer) -> None:
    """torch.profiler's table of the first packed row of one step (forward, recompute, backward)."""
    import stratos_lite as sl
    from stratos_lite.data.packing import pack_step
    from stratos_lite.train.loss import example_losses

    dataset = sl.ScoredDataset.from_jsonl(work / "train.jsonl", tokenizer, max_len=MAX_LEN)
    torch.manual_seed(0)
    shape = {**SHAPES[args.shape], "vocab_size": max(SHAPES[args.shape]["vocab_size"], tokenizer.vocab_size)}
    model = sl.Qwen3ForCausalLM(sl.Qwen3Config(**shape)).to(device(), torch.bfloat16)
    sl.apply_dora(model, RANK, ALPHA, DROPOUT, TARGETS)
    model.set_gradient_checkpointing(True)
    row = pack_step([dataset[i] for i in draws(dataset, 1)], BATCH * MAX_LEN)[0]
    print(f"a packed row of {int(row['lengths'])} tokens, {len(row['weight'])} examples")
    row = {k: v.to(device()) if isinstance(v, torch.Tensor) else v for k, v in row.items() if k != "lengths"}

    def forward_backward():
        with torch.autocast(device().type, dtype=torch.bfloat16):
            loss = example_losses(model.train(), row).sum()
        loss.backward()

    forward_backward()
    with torch.profiler.profile() as profile:
        forward_backward()
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def report(args: argparse.Namespace, work: Path, tokenizer) -> None:
    import stratos_lite as sl

    dataset = sl.ScoredDataset.from_jsonl(work / "train.jsonl", tokenizer, max_len=MAX_LEN)
    lengths = sorted(dataset.lengths)
    print(f"device: {device_name()}; torch {torch.__version__}; shape {args.shape}; bf16; DoRA r{RANK}; batch "
          f"{BATCH} x accumulation {ACCUM}; gradient checkpointing (layer); {args.steps} steps a system")
    print(f"lengths of {len(lengths)} examples: mean {sum(lengths) / len(lengths):.0f}, median "
          f"{lengths[len(lengths) // 2]}, p90 {lengths[int(0.9 * len(lengths))]}, p99 "
          f"{lengths[int(0.99 * len(lengths))]}, max {lengths[-1]} tokens")
    results = {}
    for system in ("padded", "packed", "hf"):
        out = subprocess.run([sys.executable, __file__, "--child", system, "--shape", args.shape, "--steps",
                              str(args.steps), "--data", str(work / "train.jsonl"), "--tokenizer", str(work)],
                             check=True, capture_output=True, text=True).stdout
        results[system] = json.loads(out.strip().splitlines()[-1])
    # Every system trains on the same draws, so the steps timed (all but the first) hold the same real tokens.
    timed = results["padded"]["tokens"][1:]
    seconds = {system: statistics.median(r["times"][1:]) for system, r in results.items()}
    rates = {system: sum(timed) / len(timed) / s for system, s in seconds.items()}
    print(f"padding bound of these steps (padded / real tokens): "
          f"{results['padded']['padded'] / results['padded']['real']:.3f}x")
    print(f"{'system':<28}{'s/step':>9}{'x HF':>7}{'real tokens/s':>15}{'x padded':>10}{'peak GB':>9}")
    for system, label in (("hf", "HF Trainer + PEFT, padded"), ("padded", "ours, padded"), ("packed", "ours, packed")):
        print(f"{label:<28}{seconds[system]:>9.2f}{seconds[system] / seconds['hf']:>7.2f}{rates[system]:>15.0f}"
              f"{rates[system] / rates['padded']:>10.3f}{results[system]['peak'] / 1e9:>9.2f}")


if __name__ == "__main__":
    main()
