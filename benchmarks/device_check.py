"""One prepared device check: what this GPU (NVIDIA or AMD) does with stratos_lite, in one table.

    bash benchmarks/device_check.sh --out results.md            # on the GPU machine, about 4 minutes on one H100
    bash benchmarks/device_check.sh --dry-run --out results.md  # the same rows at toy sizes, on any machine

Rows, most valuable first, each in a child process of its own, so a failure (out of memory, a compile error)
prints that row with the child's last error lines and the check goes on; each row is appended to --out as it
finishes, so a kill at a time limit still leaves the rows done:

    environment     torch, CUDA or HIP and AOTriton versions, card and memory
    kernels         the kernel SDPA gives each of the model's attention calls (training, padded prefill,
                    decode) and its error against fp32 math; on ROCm also with AOTriton's experimental kernels
    device tests    tests/test_on_device.py on the card (logits = transformers, DoRA = PEFT, resume, export,
                    generation)
    determinism     two identical short runs with deterministic = true: the same losses and adapter, bit for bit?
    8B step         a V2 step at Qwen3-8B's shape (bf16 random weights built on the card, micro-batch 2 x 1024,
                    accumulation 8, checkpointing, DoRA r16): s/step, share of the card's bf16 peak, peak
                    allocated and reserved beside the plan's predicted reserve; then HF Trainer + PEFT's
    0.6B step       ours and HF's at Qwen3-0.6B's shape
    decode          greedy tokens/s at batch 1 and 16, in order and from a CUDA graph (its capture timed
                    apart), against transformers' generate
    (--with compile,deterministic: compiled rows and deterministic = true's cost at 0.6B)

--budget SECONDS (default 300) skips, and says so, a row whose estimated time would not fit what is left.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from step_speed import SHAPES, bf16_peak, device, device_name, flops_per_step, row_command, run_row  # noqa: E402

EXPERIMENTAL = "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"


@dataclass(frozen=True)
class Row:
    name: str
    seconds: float  # what it is expected to take on one H100 (the dry run's: on any machine, at toy sizes)
    dry_seconds: float
    optional: str = ""  # the --with word that turns it on, "" for a default row


ROWS = [
    Row("kernels", 15, 6), Row("device tests", 45, 25), Row("determinism", 20, 8),
    Row("8B step, ours", 50, 6), Row("8B step, HF+PEFT", 50, 6), Row("0.6B step, ours", 25, 6),
    Row("0.6B step, HF+PEFT", 25, 6), Row("decode", 40, 10),
    Row("0.6B step, ours, compiled", 90, 40, "compile"),
    Row("0.6B step, ours, deterministic", 25, 6, "deterministic"),
]


# -- the rows' children ------------------------------------------------------------------------------------

def attention_calls(dry_run: bool) -> dict[str, dict]:
    """The shapes and masks of the model's three kinds of SDPA call, as attend() receives them: training
    (causal, no mask), prefill of a left-padded batch (boolean mask) and one decode step over a cache."""
    heads, kv, dim = (4, 2, 16) if dry_run else (32, 8, 128)  # Qwen3-8B's attention
    train_t, prompt_t, batch = (64, 32, 4) if dry_run else (1024, 512, 16)
    padded = torch.ones(batch, 1, prompt_t, prompt_t, dtype=torch.bool).tril()
    padded[1:, ..., : prompt_t // 4] = False  # rows after the first are left-padded
    padded[..., torch.arange(prompt_t), torch.arange(prompt_t)] = True
    return {
        "train": dict(q=(2, heads, train_t, dim), kv=(2, kv, train_t, dim), mask=None, grad=True),
        "prefill": dict(q=(batch, heads, prompt_t, dim), kv=(batch, kv, prompt_t, dim), mask=padded, grad=False),
        "decode": dict(q=(batch, heads, 1, dim), kv=(batch, kv, prompt_t + 1, dim),
                       mask=torch.ones(batch, 1, 1, prompt_t + 1, dtype=torch.bool), grad=False),
    }


def kernels(dry_run: bool) -> dict:
    """The kernel SDPA picks for each call and the output's largest error relative to fp32 math."""
    from stratos_lite.model.attention import attend
    from stratos_lite.model.attention_report import kernel_of_call

    dtype = torch.float32 if dry_run and device().type == "cpu" else torch.bfloat16
    found = {}
    for name, call in attention_calls(dry_run).items():
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(call[key], generator=gen).to(device(), dtype) for key in ("q", "kv", "kv"))
        mask = None if call["mask"] is None else call["mask"].to(device())
        kernel = kernel_of_call(q, k, v, mask, backward=call["grad"])
        with torch.no_grad():
            out = attend(q, k, v, mask, q.shape[1] != k.shape[1]).float()
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
                exact = attend(q.float(), k.float(), v.float(), mask, q.shape[1] != k.shape[1])
        found[name] = f"{kernel} ({((out - exact).abs().max() / exact.abs().max()).item():.1e})"
    return {"dtype": str(dtype).removeprefix("torch."), **found}


def device_tests(dry_run: bool) -> dict:
    del dry_run  # STRATOS_DEVICE_TESTS may hold pytest's options (the suite's dry run picks one test with -k)
    options = os.environ.get("STRATOS_DEVICE_TESTS", "").split()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options,
                           "tests/test_on_device.py"],
                          cwd=ROOT, env={**os.environ, "STRATOS_TEST_DEVICE": str(device())}, capture_output=True,
                          text=True)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    return {"summary": summary, "failed": failures[:5], "ok": done.returncode == 0}


def determinism(dry_run: bool) -> dict:
    """Two identical short runs with deterministic = true on this device: bitwise equal losses and adapter?"""
    from step_speed import examples
    from timing import step_records

    import stratos_lite as sl

    shape, seq = (SHAPES["tiny"], 32) if dry_run else (SHAPES["small"], 256)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config(**shape)).to(device())
        sl.apply_dora(model, 8, 16, 0.1)
        with tempfile.TemporaryDirectory() as out_dir:
            config = sl.TrainConfig(out_dir=out_dir, batch_size=2, grad_accum=2, max_steps=3, lr=1e-3,
                                    deterministic=True, dtype="auto", band_sampling=False, verify_batches=0,
                                    save_every=10**9, progress=False)
            sl.Trainer(model, examples(shape["vocab_size"], seq, 16), config).train()
            losses = [r["loss"] for r in step_records(out_dir)]
        runs.append((losses, [p.detach().cpu() for p in model.parameters() if p.requires_grad]))
    same_losses = runs[0][0] == runs[1][0]
    same_adapter = all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    return {"losses": "bitwise equal" if same_losses else f"differ: {runs[0][0]} vs {runs[1][0]}",
            "adapter": "bitwise equal" if same_adapter else "differs", "ok": same_losses and same_adapter}


def decode(dry_run: bool) -> dict:
    """Greedy tokens/s at batch 1 and 16: ours in order, ours from a CUDA graph (the first call captures it,
    timed apart; later calls of the shape replay it), and transformers' generate, on the same random weights."""
    import transformers
    from timing import median_seconds

    import stratos_lite as sl
    from stratos_lite.model.qwen3 import new_model

    shape = SHAPES["tiny" if dry_run else "qwen3-0.6b"]
    dtype = torch.float32 if dry_run and device().type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device()):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**shape), dtype=dtype).eval()
        ours = new_model(sl.Qwen3Config(**shape), dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    prompt, new = (16, 8) if dry_run else (256, 128)
    rows = {}
    for batch in (1, 16):
        prompts = [list(range(10 + i, 10 + i + prompt)) for i in range(batch)]
        ids = torch.tensor(prompts, device=device())
        in_order = median_seconds(lambda p=prompts: sl.generate(ours, p, max_new_tokens=new), repeats=3, warmup=1)
        start = time.perf_counter()
        sl.generate(ours, prompts, max_new_tokens=new, cuda_graph=True)  # warm-up and capture, once per shape
        first = time.perf_counter() - start
        replayed = median_seconds(lambda p=prompts: sl.generate(ours, p, max_new_tokens=new, cuda_graph=True),
                                  repeats=3, warmup=0)
        theirs = median_seconds(lambda i=ids: hf_greedy(hf, i, new), repeats=3, warmup=1)
        rows[f"batch {batch}"] = {"ours": batch * new / in_order, "graph": batch * new / replayed,
                                  "capture_s": max(first - replayed, 0.0), "transformers": batch * new / theirs}
    return rows


def hf_greedy(model, ids: torch.Tensor, new: int) -> None:
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, eos_token_id=None)


CHILDREN = {"kernels": kernels, "device tests": device_tests, "determinism": determinism, "decode": decode}


# -- the parent: environment, rows in children, the table ----------------------------------------------------

def environment() -> list[tuple[str, str]]:
    from stratos_lite.model.attention_report import versions

    rows = [("python", platform.python_version()), ("versions", versions()), ("device", device_name())]
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
        peak = bf16_peak()
        rows += [("memory", f"{memory / 2**30:.1f} GiB"),
                 ("bf16 dense peak", f"{peak / 1e12:.0f} TFLOP/s (vendor sheet)" if peak else "not known here"),
                 (EXPERIMENTAL, os.environ.get(EXPERIMENTAL, "unset"))]
    return rows


def step_row(name: str, dry_run: bool) -> list[str]:
    """The step_speed child of a step row (ours or HF+PEFT at the 8B or 0.6B shape, and the optional ones)."""
    system = "hf" if "HF" in name else "stratos_lite"
    settings = {"checkpoint_policy": "layer", **({"compile": True} if "compiled" in name else {}),
                **({"deterministic": True} if "deterministic" in name else {})}
    if dry_run:
        return row_command(system, "tiny", 32, "float32" if device().type == "cpu" else "bfloat16", 3, settings)
    shape = "qwen3-8b" if name.startswith("8B") else "qwen3-0.6b"
    return row_command(system, shape, 1024, "bfloat16", 5, settings)


def child_of(row: Row, dry_run: bool) -> tuple[list[str], dict | None]:
    """The command that runs `row` in a child of its own, and its environment (None: this one's)."""
    flag = ["--dry-run"] if dry_run else []
    if row.name.startswith("kernels"):  # on ROCm also with the experimental kernels: a child of its own each
        env = {**os.environ, EXPERIMENTAL: "1"} if "experimental" in row.name else None
        return [sys.executable, __file__, "--row", "kernels", *flag], env
    if row.name in CHILDREN:
        return [sys.executable, __file__, "--row", row.name, *flag], None
    return step_row(row.name, dry_run), None


def rows_for(extra: set[str]) -> list[Row]:
    """The default rows, the optional ones asked for, and on ROCm the kernels again with AOTriton's experimental
    kernels on (they decide the training kernel on Navi31, and the report's NaNs came with them)."""
    rows = [row for row in ROWS if not row.optional or row.optional in extra]
    if torch.version.hip:
        rows.insert(1, Row(f"kernels, {EXPERIMENTAL}=1", 15, 6))
    return rows


def step_text(row: Row, result: dict, dry_run: bool, ours: dict | None) -> str:
    """s/step, the model FLOP/s and its share of the card's bf16 peak, peak memory beside the plan's reserve;
    for HF's row, our step's time as a share of its."""
    shape = "tiny" if dry_run else ("qwen3-8b" if row.name.startswith("8B") else "qwen3-0.6b")
    flops, seconds = flops_per_step(SHAPES[shape], 32 if dry_run else 1024), result["seconds"]
    peak = bf16_peak()
    text = (f"{seconds:.3f} s/step, {flops / seconds / 1e12:.1f} TFLOP/s"
            + (f", {flops / seconds / peak:.1%} of the bf16 peak" if peak else ""))
    if device().type != "cuda":  # what a CPU shows is resident memory, which the plan does not predict
        return text + f"; peak RSS growth {result['peak'] / 1e9:.2f} GB" + _against(ours, seconds)
    text += f"; peak {result['peak'] / 1e9:.2f} GB allocated, {result['reserved'] / 1e9:.2f} GB reserved"
    if "plan_reserved" in result:
        off = result["reserved"] / result["plan_reserved"] - 1
        text += f"; plan {result['plan_reserved'] / 1e9:.2f} GB reserved (measured {off:+.1%})"
    return text + _against(ours, seconds)


def _against(ours: dict | None, seconds: float) -> str:
    return f"; ours takes {ours['seconds'] / seconds:.2f}x its time" if ours and "seconds" in ours else ""

def describe(row: Row, result: dict, dry_run: bool, done: dict[str, dict]) -> str:
    if "error" in result:
        return f"FAILED: {result['error']}"
    if "seconds" in result:
        return step_text(row, result, dry_run, done.get(row.name.replace("HF+PEFT", "ours")) if "HF" in row.name
                         else None)
    if row.name == "decode":
        return "; ".join(f"{batch}: ours {r['ours']:.0f}, graph {r['graph']:.0f} (capture {r['capture_s']:.2f} s), "
                         f"transformers {r['transformers']:.0f} tok/s ({r['graph'] / r['transformers']:.2f}x)"
                         for batch, r in result.items())
    return ", ".join(f"{key} {value}" for key, value in result.items() if key != "ok")


class Table:
    """The check's markdown table, printed and appended to --out row by row (a kill keeps what is done)."""

    def __init__(self, out: Path | None):
        self.out = out
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")

    def write(self, text: str) -> None:
        print(text, flush=True)
        if self.out is not None:
            with open(self.out, "a") as f:
                f.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes: checks the script end to end anywhere")
    parser.add_argument("--budget", type=float, default=300, help="seconds the check may take (rows that would "
                                                                  "not fit are skipped, and said so)")
    parser.add_argument("--with", dest="extra", default="", help="optional rows: compile, deterministic")
    parser.add_argument("--out", type=Path, help="append each row here as it finishes (e.g. $OUT/device_check.md)")
    parser.add_argument("--row", choices=list(CHILDREN), help=argparse.SUPPRESS)  # a child: one row as JSON
    args = parser.parse_args()
    if args.row:
        print(json.dumps(CHILDREN[args.row](args.dry_run)))
        return
    start, table = time.perf_counter(), Table(args.out)
    title = f"# stratos_lite device check{' (dry run: toy sizes)' if args.dry_run else ''}, {time.strftime('%Y-%m-%d')}"
    table.write(f"{title}, budget {args.budget:.0f} s\n\n| row | result | seconds |\n|---|---|---:|")
    for name, value in environment():
        table.write(f"| {name} | {value} | |")
    done: dict[str, dict] = {}
    commands: dict[str, tuple[list[str], dict | None]] = {}  # row -> the child that ran it
    for row in rows_for({word for word in args.extra.split(",") if word}):
        estimate = row.dry_seconds if args.dry_run else row.seconds
        left = args.budget - (time.perf_counter() - start)
        if estimate > left:
            table.write(f"| {row.name} | skipped: about {estimate:.0f} s, {max(left, 0):.0f} s of the budget left | |")
            continue
        began, (command, env) = time.perf_counter(), child_of(row, args.dry_run)
        # At the dry run's toy sizes the 8B and 0.6B rows are one command: it runs once, and both rows show it.
        twin = next((name for name, ran in commands.items() if ran == (command, env)), None)
        done[row.name] = done[twin] if twin else run_row(command, timeout=left, env=env)
        commands[row.name] = (command, env)
        table.write(f"| {row.name} | {describe(row, done[row.name], args.dry_run, done)}"
                    f"{f' (the command of {twin})' if twin else ''} | {time.perf_counter() - began:.0f} |")
    table.write(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
