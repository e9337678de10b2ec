"""One prepared device check: what this GPU (NVIDIA or AMD) does with stratos_lite, in one table.

    bash benchmarks/device_check.sh             # on the GPU machine, ~8 minutes on one card
    bash benchmarks/device_check.sh --dry-run   # the same steps at toy sizes, on whatever device there is

Sections: the environment (torch, CUDA/HIP, AOTriton, card, memory); the attention kernel SDPA gives each
of the model's calls (training, prefill, decode), found by profiling the call, and its error against fp32
math; the tests that run on a device (tests/test_on_device.py: logits = transformers, DoRA = PEFT, a
trainer step and resume, export from a model on the device, generation); benchmarks/step_speed.py at
Qwen3-0.6B's and Qwen3-8B's shapes (random bf16 weights, the V2 micro-batch 2 x 8 of 1024 tokens,
checkpointing; at 0.6B also with compile = true and with deterministic = true) against HF Trainer + PEFT
in the same run; greedy decoding tokens/s at batch 1 and 16, in order and replayed from a CUDA graph
(generate's cuda_graph), against transformers' generate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from step_speed import SHAPES, device, device_name  # noqa: E402
from timing import median_seconds  # noqa: E402

import stratos_lite as sl  # noqa: E402
from stratos_lite.model.attention_report import kernel_of_call, versions  # noqa: E402
from stratos_lite.model.qwen3 import attend  # noqa: E402


def environment() -> list[tuple[str, str]]:
    rows = [("python", platform.python_version()), ("versions", versions()), ("device", device_name())]
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
        rows += [("memory", f"{memory / 2**30:.1f} GiB"),
                 ("TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL", os.environ.get("TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL",
                                                                            "unset"))]
    return rows


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


def kernel_of(call: dict, dtype: torch.dtype) -> tuple[str, float]:
    """The kernel SDPA picked for `call` and the output's largest error relative to the same call in fp32
    through the math kernel."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(call[key], generator=gen).to(device(), dtype) for key in ("q", "kv", "kv"))
    mask = None if call["mask"] is None else call["mask"].to(device())
    kernel = kernel_of_call(q, k, v, mask, backward=call["grad"])
    with torch.no_grad():
        out = attend(q, k, v, mask, q.shape[1] != k.shape[1]).float()
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            exact = attend(q.float(), k.float(), v.float(), mask, q.shape[1] != k.shape[1])
    return kernel, ((out - exact).abs().max() / exact.abs().max()).item()


def run_tests() -> str:
    env = {**os.environ, "STRATOS_TEST_DEVICE": str(device())}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_on_device.py"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"{summary} ({time.perf_counter() - start:.0f} s, STRATOS_TEST_DEVICE={device()})"


def step_speed(dry_run: bool) -> list[str]:
    runs = ([["--shape", "small", "--seq", "64", "--steps", "3", "--dtypes", "float32", "--accum", "2",
              "--deterministic"]] if dry_run
            else [["--shape", "qwen3-0.6b", "--seq", "1024", "--steps", "5", "--dtypes", "bfloat16", "--compile",
                   "--deterministic"],
                  ["--shape", "qwen3-8b", "--seq", "1024", "--steps", "4", "--dtypes", "bfloat16"]])
    lines = []
    for arguments in runs:
        result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), *arguments], cwd=ROOT,
                                capture_output=True, text=True)
        output = result.stdout.strip().splitlines() if result.returncode == 0 else [
            f"step_speed {' '.join(arguments)} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}"]
        lines += output
    return lines


def decode_speed(dry_run: bool) -> list[tuple[int, float, float, float]]:
    """Greedy tokens/s at batch 1 and 16: ours in order, ours replayed from a CUDA graph, and transformers'
    generate, on the same random weights."""
    import transformers

    shape = (dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16) if dry_run else
             SHAPES["qwen3-0.6b"])
    dtype = torch.float32 if dry_run else torch.bfloat16
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape)).to(device(), dtype).eval()
    ours = sl.Qwen3ForCausalLM(sl.Qwen3Config(**shape)).to(device(), dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    prompt, new = (16, 8) if dry_run else (256, 128)
    rows = []
    for batch in (1, 16):
        prompts = [list(range(10 + i, 10 + i + prompt)) for i in range(batch)]
        ids = torch.tensor(prompts, device=device())
        mine = median_seconds(lambda p=prompts: sl.generate(ours, p, max_new_tokens=new), repeats=3, warmup=1)
        graphed = median_seconds(lambda p=prompts: sl.generate(ours, p, max_new_tokens=new, cuda_graph=True),
                                 repeats=3, warmup=1)
        theirs = median_seconds(lambda i=ids: _hf_greedy(hf, i, new), repeats=3, warmup=1)
        rows.append((batch, batch * new / mine, batch * new / graphed, batch * new / theirs))
    return rows


def _hf_greedy(model, ids: torch.Tensor, new: int) -> None:
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, eos_token_id=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes: checks the script end to end anywhere")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"# stratos_lite device check{' (dry run: toy sizes)' if args.dry_run else ''}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| environment | |\n|---|---|")
    print("\n".join(f"| {name} | {value} |" for name, value in environment()))
    dtype = torch.float32 if args.dry_run and device().type == "cpu" else torch.bfloat16
    print(f"\n| SDPA call ({str(dtype).removeprefix('torch.')}) | kernel | max error vs fp32 math (relative) |"
          "\n|---|---|---:|")
    for name, call in attention_calls(args.dry_run).items():
        kernel, error = kernel_of(call, dtype)
        print(f"| {name} | {kernel} | {error:.2e} |")
    print(f"\ntests on the device: {run_tests()}\n")
    print("\n".join(step_speed(args.dry_run)))
    print("\n| greedy decoding | stratos_lite tokens/s | with cuda_graph | transformers tokens/s | ratios |"
          "\n|---|---:|---:|---:|---:|")
    for batch, mine, graphed, theirs in decode_speed(args.dry_run):
        print(f"| batch {batch} | {mine:.0f} | {graphed:.0f} | {theirs:.0f} | {mine / theirs:.2f}x, "
              f"{graphed / theirs:.2f}x |")
    print(f"\n{json.dumps({'seconds': round(time.perf_counter() - start)})}")


if __name__ == "__main__":
    main()
