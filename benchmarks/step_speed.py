"""Seconds per optimizer step: stratos_lite's Trainer against HF Trainer + PEFT DoRA, same settings, same run.

    python benchmarks/step_speed.py                      # the small model, fp32 and bf16, on this machine
    python benchmarks/step_speed.py --shape qwen3-0.6b --seq 1024 --dtypes bfloat16   # on a GPU

Batch 2 x accumulation 8, the last 20 % of each sequence as completion, DoRA r16/a32/0.05 on all seven
linears, gradient checkpointing (ours with both policies: whole layer, as HF does, and MLP only; with
--compile also both with TrainConfig.compile, whose compilation falls in the warm-up steps; with
--deterministic also the layer policy with TrainConfig.deterministic, to show what it costs). Each
(system, dtype, settings) runs in a fresh process; the median step time after two warm-up steps is reported
with tokens/s, model FLOP/s as a share of the measured matmul rate, peak memory (CPU: peak RSS growth during
training; GPU: peak allocated, and reserved: what an OOM depends on) and, for ours, the plan's figures made
before the run: its live peak and what it expects PyTorch's caching allocator to reserve (with the BLAS
workspace) on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from timing import step_records

SHAPES = {
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
BATCH, ACCUM, RANK, ALPHA, DROPOUT = 2, 8, 16, 32, 0.05  # the report's batch; --batch/--accum change it
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if not torch.cuda.is_available():
        return f"CPU, {torch.get_num_threads()} threads"
    props = torch.cuda.get_device_properties(0)
    arch = getattr(props, "gcnArchName", "") or f"sm_{props.major}{props.minor}"  # gfx1100 on Navi31 (ROCm)
    return f"{props.name} ({arch})"


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
    """Model FLOPs of one optimizer step: forward + backward to the activations (frozen base, so no weight
    gradients beyond the adapters'); activation recomputation not counted."""
    h, d = shape["hidden_size"], shape["head_dim"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    per_layer = h * d * (2 * heads + 2 * kv) + 3 * h * shape["intermediate_size"]
    tokens = BATCH * ACCUM * seq
    forward = 2 * per_layer * shape["num_hidden_layers"] * tokens
    forward += 2 * h * shape["vocab_size"] * tokens // 5  # vocabulary projection at completion positions
    forward += 2 * 2 * seq * seq * heads * d * shape["num_hidden_layers"] * BATCH * ACCUM // 2  # causal attention
    return 2.0 * forward


def matmul_rate(dtype: torch.dtype) -> float:
    n = 8192 if torch.cuda.is_available() else 2048  # large enough to reach a GPU's peak
    a, b = torch.randn(n, n, device=device()).to(dtype), torch.randn(n, n, device=device()).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        _sync()
        start = time.perf_counter()
        a @ b
        _sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_ours(shape: dict, seq: int, dtype: str, steps: int, out_dir: str,
             settings: dict) -> tuple[list[float], dict]:
    """Step times, and the plan's live peak and GPU reserve for the same run (made before it); `settings` are
    the row's TrainConfig fields (checkpoint_policy, compile, deterministic)."""
    import stratos_lite as sl
    from stratos_lite.planning.report import DataShape

    torch.manual_seed(0)
    model = sl.Qwen3ForCausalLM(sl.Qwen3Config(**shape)).to(device())
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    sl.apply_dora(model, RANK, ALPHA, DROPOUT, TARGETS)
    config = sl.TrainConfig(out_dir=out_dir, batch_size=BATCH, grad_accum=ACCUM, lr=1e-5, max_steps=steps,
                            dtype=dtype, gradient_checkpointing=True, band_sampling=False, verify_batches=0,
                            save_every=10**9, progress=False, **settings)
    data = DataShape(64, seq, seq // 5, seq, "step_speed", [seq] * 64, 0.2)  # what examples() makes
    the_plan = sl.plan(config, model_config=sl.Qwen3Config(**shape), data=data, device=device())
    sl.Trainer(model, examples(shape["vocab_size"], seq, 64), config).train()
    metrics = step_records(out_dir)
    return [m["step_seconds"] for m in metrics], {"plan": the_plan.peak,
                                                  "plan_reserved": the_plan.reserved + the_plan.workspace}


def run_hf(shape: dict, seq: int, dtype: str, steps: int, out_dir: str,
           settings: dict) -> tuple[list[float], dict]:
    del settings  # HF's row is the anchor: whole decoder layers checkpointed, eager, nondeterministic
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.Qwen3Config(**shape)
    model = transformers.Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, use_dora=True,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    times: list[float] = []
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in examples(shape["vocab_size"], seq, 64)]
    transformers.Trainer(model=model, args=hf_arguments(out_dir, steps, dtype), train_dataset=rows,
                         callbacks=[hf_step_timer(times)]).train()
    return times, {}


def hf_arguments(out_dir: str, steps: int, dtype: str, batch: int = 0, accum: int = 0):
    """HF Trainer's settings for the report's recipe (cosine, 5 % warmup, clip 1.0, checkpointing), nothing
    saved, evaluated or logged."""
    import transformers

    return transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch or BATCH, gradient_accumulation_steps=accum or ACCUM,
        max_steps=steps, learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0.05, max_grad_norm=1.0,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == "bfloat16", save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10**6,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False)


def hf_step_timer(times: list[float]):
    """A TrainerCallback appending each optimizer step's seconds to `times` (the device synced at both ends)."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            times.append(time.perf_counter() - self.start)

    return StepTimer()


def child(system: str, shape_name: str, seq: int, dtype: str, steps: int, settings: dict) -> None:
    import tempfile

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = rss()
    runner = run_ours if system == "stratos_lite" else run_hf
    with tempfile.TemporaryDirectory() as out_dir:
        times, planned = runner(SHAPES[shape_name], seq, dtype, steps, out_dir, settings)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else peak  # what an OOM depends on
    print(json.dumps({"seconds": statistics.median(times[2:]), "peak": peak, "reserved": reserved, **planned}))


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
    flops = flops_per_step(shape, args.seq)
    tokens = BATCH * ACCUM * args.seq
    print(f"{'dtype':<10}{'system':<23}{'s/step':>8}{'ratio':>7}{'tokens/s':>10}{'TFLOP/s':>9}{'of matmul':>11}"
          f"{'peak GB':>9}{'reserved':>10}{'plan':>7}{'plan reserved':>15}")
    for dtype in args.dtypes:
        rate = matmul_rate(getattr(torch, dtype))
        results = {}
        for label, system, settings in runs(args.compile, args.deterministic):
            out = subprocess.run([sys.executable, __file__, "--child", system, "--shape", args.shape, "--seq",
                                  str(args.seq), "--steps", str(args.steps), "--dtypes", dtype,
                                  "--settings", json.dumps(settings), "--batch", str(BATCH), "--accum", str(ACCUM)],
                                 check=True, capture_output=True, text=True).stdout
            results[label] = json.loads(out.strip().splitlines()[-1])
        for label, r in results.items():
            achieved = flops / r["seconds"]
            print(f"{dtype:<10}{label:<23}{r['seconds']:>8.3f}{r['seconds'] / results['HF+PEFT']['seconds']:>7.2f}"
                  f"{tokens / r['seconds']:>10.0f}{achieved / 1e12:>9.2f}{achieved / rate:>10.1%}"
                  f"{r['peak'] / 1e9:>9.2f}{r['reserved'] / 1e9:>10.2f}{gb(r.get('plan')):>7}"
                  f"{gb(r.get('plan_reserved')):>15}")
        print(f"{'':<10}(matmul rate {rate / 1e9:.0f} GFLOP/s in {dtype})")


if __name__ == "__main__":
    main()
