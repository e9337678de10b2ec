"""Seconds per optimizer step: stratos_lite's Trainer against HF Trainer + PEFT DoRA, same settings, same run.

    python benchmarks/step_speed.py                      # the small model, fp32 and bf16, on this machine
    python benchmarks/step_speed.py --shape qwen3-0.6b --seq 1024 --dtypes bfloat16   # on a GPU

Batch 2 x accumulation 8, the last 20 % of each sequence as completion, DoRA r16/a32/0.05 on all seven
linears, gradient checkpointing (ours with both policies: whole layer, as HF does, and MLP only; with
--compile also both with TrainConfig.compile, whose compilation falls in the warm-up steps; with
--deterministic also the layer policy with TrainConfig.deterministic, to show what it costs).

Each (system, dtype, settings) row runs in a fresh process (`--child`, which benchmarks/device_check.py runs
too): the model is built with random weights in the compute dtype directly on the device (no fp32 copy on
the host), then the plan is made, then the peak counters are reset, so the memory columns are the training
step's: peak allocated and reserved (what an OOM depends on) on a GPU, peak RSS growth on a CPU, beside the
plan's live peak and the reserve it predicts. A row that fails prints the child's last error lines in its
place, and the others go on. Reported: the median step after two warm-up steps, tokens/s, and the model
FLOPs of the step as a share of the measured matmul rate and, where the card is known, of its bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import step_records

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # stratos_lite from this clone, installed or not

SHAPES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),  # the device check's dry run
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
BATCH, ACCUM, RANK, ALPHA, DROPOUT = 2, 8, 16, 32, 0.05  # the report's batch; --batch/--accum change it
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dense bf16 tensor-core peaks from the vendors' sheets (no sparsity), by a name torch reports.
BF16_PEAKS = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12,
              "RTX 4090": 165e12, "Radeon RX 7900 XTX": 123e12, "MI300X": 1307e12}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if not torch.cuda.is_available():
        return f"CPU, {torch.get_num_threads()} threads"
    props = torch.cuda.get_device_properties(0)
    arch = getattr(props, "gcnArchName", "") or f"sm_{props.major}{props.minor}"  # gfx1100 on Navi31 (ROCm)
    return f"{props.name} ({arch})"


def bf16_peak() -> float | None:
    """The card's dense bf16 peak from its sheet, when torch's name for it is one we know."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for known, peak in BF16_PEAKS.items() if known in name), None)


def examples(vocab: int, seq: int, count: int, completion: int | None = None) -> list[dict]:
    """Random token sequences whose last `completion` positions (default: a fifth) carry labels."""
    completion = seq // 5 if completion is None else completion
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (seq,), generator=gen)
        labels = ids.clone()
        labels[: seq - completion] = -100
        rows.append({"input_ids": ids, "labels": labels, "weight": 1.0, "band": 0})
    return rows


def flops_per_step(shape: dict, seq: int) -> float:
    """Model FLOPs of one optimizer step: per token the forward, its recomputation under checkpointing and the
    gradient to the activations (2P each for the linears' P parameters; a frozen base has no weight gradients:
    about 43 GFLOP a token at Qwen3-8B), the vocabulary projection's forward and input gradient at completion
    positions, and causal attention's matmuls in the same three passes."""
    h, d = shape["hidden_size"], shape["head_dim"]
    heads, kv, layers = shape["num_attention_heads"], shape["num_key_value_heads"], shape["num_hidden_layers"]
    linear = layers * (h * d * (2 * heads + 2 * kv) + 3 * h * shape["intermediate_size"])
    tokens = BATCH * ACCUM * seq
    attention = 3 * 2 * 2 * seq * d * heads * layers * tokens / 2  # q.k and p.v, causal: half of the T x T
    return 3 * 2 * linear * tokens + 2 * 2 * h * shape["vocab_size"] * (tokens // 5) + attention


def matmul_rate(dtype: torch.dtype) -> float:
    """The best of five n x n matmuls, in FLOP/s; the buffers are freed (and a GPU's cache emptied) after."""
    n = 8192 if torch.cuda.is_available() else 2048  # large enough to reach a GPU's peak
    a, b = torch.randn(n, n, device=device()).to(dtype), torch.randn(n, n, device=device()).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        synchronize()
        start = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - start)
    del a, b
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # children need the card, not this process's cache
    return 2 * n**3 / best


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def ours(shape: dict, seq: int, dtype: torch.dtype, steps: int, out_dir: str, settings: dict) -> tuple[list, dict]:
    """Our model built on the device in `dtype`, DoRA (or LoRA: settings' mode) on it, planned, then trained:
    (step seconds, plan)."""
    import stratos_lite as sl
    from stratos_lite.model.nf4 import quantize_base
    from stratos_lite.model.qwen3 import new_model
    from stratos_lite.planning.report import DataShape

    torch.manual_seed(0)
    with torch.device(device()):
        model = new_model(sl.Qwen3Config(**shape), dtype)
    apply = sl.apply_lora if settings.get("mode") == "lora" else sl.apply_dora
    apply(model, RANK, ALPHA, DROPOUT, TARGETS, rslora=settings.get("rslora", False))
    if settings.get("base_quant") == "nf4":
        quantize_base(model)  # the random weights, quantized where they lie
    config = sl.TrainConfig(out_dir=out_dir, batch_size=BATCH, grad_accum=ACCUM, lr=1e-5, max_steps=steps,
                            dtype=str(dtype).removeprefix("torch."), gradient_checkpointing=True,
                            band_sampling=False, verify_batches=0, save_every=10**9, progress=False, **settings)
    data = DataShape(64, seq, seq // 5, seq, "step_speed", [seq] * 64, 0.2)  # what examples() makes
    the_plan = sl.plan(config, model_config=sl.Qwen3Config(**shape), data=data, device=device())
    train = examples(shape["vocab_size"], seq, 64)
    measure_from_here()
    sl.Trainer(model, train, config).train()
    return [r["step_seconds"] for r in step_records(out_dir)], {"plan": the_plan.peak,
                                                                "plan_reserved": the_plan.reserved + the_plan.workspace}


def hf(shape: dict, seq: int, dtype: torch.dtype, steps: int, out_dir: str, settings: dict) -> tuple[list, dict]:
    """HF Trainer + PEFT DoRA on transformers' Qwen3 built on the device in `dtype`: (step seconds, {})."""
    del settings  # HF's row is the anchor: whole decoder layers checkpointed, eager, nondeterministic
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with torch.device(device()):
        model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**shape), dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, use_dora=True,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    times: list[float] = []
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in examples(shape["vocab_size"], seq, 64)]
    trainer = transformers.Trainer(model=model, args=hf_arguments(out_dir, steps, dtype), train_dataset=rows,
                                   callbacks=[hf_step_timer(times)])
    measure_from_here()
    trainer.train()
    return times, {}


def measure_from_here() -> None:
    """From here on the peak counters measure the training: loading and planning are behind them."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def hf_arguments(out_dir: str, steps: int, dtype: torch.dtype, batch: int = 0, accum: int = 0):
    """HF Trainer's settings for the report's recipe (cosine, 5 % warmup, clip 1.0, checkpointing), nothing
    saved, evaluated or logged."""
    import transformers

    return transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch or BATCH, gradient_accumulation_steps=accum or ACCUM,
        max_steps=steps, learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0.05, max_grad_norm=1.0,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16, save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10**6,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False)


def hf_step_timer(times: list[float]):
    """A TrainerCallback appending each optimizer step's seconds to `times` (the device synced at both ends)."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            times.append(time.perf_counter() - self.start)

    return StepTimer()


def child(system: str, shape_name: str, seq: int, dtype: str, steps: int, settings: dict) -> None:
    """One row, in this process: its step times and memory as one JSON line on stdout."""
    before = rss()
    runner = ours if system == "stratos_lite" else hf
    with tempfile.TemporaryDirectory() as out_dir:
        times, planned = runner(SHAPES[shape_name], seq, getattr(torch, dtype), steps, out_dir, settings)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else peak
    print(json.dumps({"seconds": statistics.median(times[2:] or times), "peak": peak, "reserved": reserved,
                      **planned}))


def row_command(system: str, shape: str, seq: int, dtype: str, steps: int, settings: dict) -> list[str]:
    return [sys.executable, __file__, "--child", system, "--shape", shape, "--seq", str(seq), "--steps", str(steps),
            "--dtypes", dtype, "--settings", json.dumps(settings), "--batch", str(BATCH), "--accum", str(ACCUM)]


def run_row(command: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """A row's child; its JSON line, or {"error": its last lines} when it fails or outruns `timeout`."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(lines) or f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_rows(rows: list[tuple[str, dict]], shape: str, seq: int, dtype: str, steps: int,
                     rounds: int) -> None:
    """Our rows (label, TrainConfig settings) run `rounds` times in turn, so that a drift of the machine's speed
    falls on all of them; printed: each row's median step over the rounds, the median of its ratios to the first
    row in the same round, its peak memory beside the plan's."""
    results: dict[str, list[dict]] = {label: [] for label, _ in rows}
    for _ in range(rounds):
        for label, settings in rows:
            result = run_row(row_command("stratos_lite", shape, seq, dtype, steps, settings))
            if "error" in result:
                print(f"  {label}: FAILED: {result['error']}", flush=True)
            results[label].append(result)
    print(f"  {'':<28}{'s/step':>8}{'ratio':>8}{'peak GB':>9}{'plan GB':>9}")
    for label, _ in rows:
        pairs = [(mine, anchor) for mine, anchor in zip(results[label], results[rows[0][0]], strict=True)
                 if "error" not in mine and "error" not in anchor]
        if not pairs:
            continue
        seconds = statistics.median(mine["seconds"] for mine, _ in pairs)
        ratio = statistics.median(mine["seconds"] / anchor["seconds"] for mine, anchor in pairs)
        peak = max(mine["peak"] for mine, _ in pairs)
        print(f"  {label:<28}{seconds:>8.2f}{ratio:>8.3f}{peak / 1e9:>9.2f}{pairs[0][0]['plan'] / 1e9:>9.2f}",
              flush=True)


def runs(with_compiled: bool, with_deterministic: bool) -> list[tuple[str, str, dict]]:
    """(label, system, TrainConfig settings) of each row, HF + PEFT first (the ratios' anchor)."""
    rows = [("HF+PEFT", "hf", {}), ("ours, layer", "stratos_lite", {"checkpoint_policy": "layer"}),
            ("ours, mlp", "stratos_lite", {"checkpoint_policy": "mlp"})]
    if with_compiled:
        rows += [("ours, layer, compiled", "stratos_lite", {"checkpoint_policy": "layer", "compile": True}),
                 ("ours, mlp, compiled", "stratos_lite", {"checkpoint_policy": "mlp", "compile": True})]
    if with_deterministic:
        rows += [("ours, layer, determin.", "stratos_lite", {"checkpoint_policy": "layer", "deterministic": True})]
    return rows


def gb(size: int | None) -> str:
    return "" if size is None else f"{size / 1e9:.2f}"


def row_text(label: str, result: dict, anchor: float | None, flops: float, tokens: int, rate: float) -> str:
    """One table row: time, ratio to the anchor, tokens/s, FLOP/s and its shares, memory beside the plan."""
    if "error" in result:
        return f"{label:<23}FAILED: {result['error']}"
    seconds = result["seconds"]
    achieved, peak = flops / seconds, bf16_peak()
    ratio = f"{seconds / anchor:>7.2f}" if anchor else f"{'':>7}"
    return (f"{label:<23}{seconds:>8.3f}{ratio}{tokens / seconds:>10.0f}{achieved / 1e12:>9.2f}"
            f"{achieved / rate:>10.1%}{(f'{achieved / peak:.1%}' if peak else ''):>9}{result['peak'] / 1e9:>9.2f}"
            f"{result['reserved'] / 1e9:>10.2f}{gb(result.get('plan')):>7}{gb(result.get('plan_reserved')):>15}")


def main() -> None:
    global BATCH, ACCUM  # the run's batch shape, read by the runners and the FLOP count
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--child", choices=["stratos_lite", "hf"])
    parser.add_argument("--settings", default="{}", help="(child) the row's TrainConfig settings, as JSON")
    parser.add_argument("--batch", type=int, default=BATCH, help="micro-batch size")
    parser.add_argument("--accum", type=int, default=ACCUM, help="micro-batches per optimizer step")
    parser.add_argument("--compile", action="store_true", help="also ours with compile = true")
    parser.add_argument("--deterministic", action="store_true", help="also ours with deterministic = true")
    args = parser.parse_args()
    BATCH, ACCUM = args.batch, args.accum
    if args.child:
        return child(args.child, args.shape, args.seq, args.dtypes[0], args.steps, json.loads(args.settings))
    shape = SHAPES[args.shape]
    print(f"device: {device_name()}; torch {torch.__version__}; shape {args.shape}; seq {args.seq}; "
          f"batch {BATCH} x accumulation {ACCUM}; DoRA r{RANK}/a{ALPHA}/{DROPOUT}; gradient checkpointing")
    flops, tokens = flops_per_step(shape, args.seq), BATCH * ACCUM * args.seq
    print(f"{'system':<23}{'s/step':>8}{'ratio':>7}{'tokens/s':>10}{'TFLOP/s':>9}{'of matmul':>10}{'of peak':>9}"
          f"{'peak GB':>9}{'reserved':>10}{'plan':>7}{'plan reserved':>15}")
    for dtype in args.dtypes:
        rate = matmul_rate(getattr(torch, dtype))
        print(f"{dtype} (matmul rate {rate / 1e12:.2f} TFLOP/s)")
        anchor = None
        for label, system, settings in runs(args.compile, args.deterministic):
            result = run_row(row_command(system, args.shape, args.seq, dtype, args.steps, settings))
            anchor = anchor or (result.get("seconds") if system == "hf" else None)
            print(row_text(label, result, anchor, flops, tokens, rate), flush=True)


if __name__ == "__main__":
    main()
