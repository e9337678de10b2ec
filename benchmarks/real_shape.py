"""The whole pipeline at Qwen3-0.6B's exact shape, random weights, Qwen3's real tokenizer and chat template.

    python benchmarks/real_shape.py [--work /tmp/sl_real_shape] [--steps 4] [--skip-hf]

Phases, each timed: save a bf16 HF folder (sharded) -> plan -> DoRA r16 training in bf16 at max_len 1024 on
generated scored records (band sampling, accumulation) through tools/train.py, killed with SIGKILL once its
first checkpoint is on disk and resumed to the end -> load the result and generate with the adapters
unmerged -> merge -> export q8_0 -> llama.cpp loads the file and answers through the embedded chat
template. Then tokens/s of a training step against HF Trainer + PEFT at the same shape
(benchmarks/step_speed.py, same run). The tokenizer is the one vendored for the tests (tests/data/qwen3).
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import stratos_lite as sl
from stratos_lite.data.task import SYSTEM_PROMPT, scoring_messages
from stratos_lite.demo.data import make_records, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
             max_position_embeddings=40960, eos_token_id=151645)
FILLER = ("The ministry published the figures on Tuesday, and analysts in the region expect the numbers to "
          "move again before the end of the quarter, when the next survey is due. ")


def qwen3_tokenizer(folder: Path) -> sl.Tokenizer:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes(gzip.decompress((ROOT / "tests/data/qwen3" / f"{name}.gz").read_bytes()))
    return sl.Tokenizer.from_pretrained(folder)


def long_records(count: int, tokenizer: sl.Tokenizer, max_len: int) -> list[dict]:
    """The demo's scored records with their articles lengthened so each example is close to max_len."""
    records = make_records(max(1, count // 5), 5, seed=0)[:count]
    for record in records:
        messages = scoring_messages(record["profile"], record["title"], record["article"])
        used = len(tokenizer.encode_chat(messages, record["reasoning"]).input_ids)
        room = max_len - used - 40
        repeats = max(0, room // len(tokenizer.encode(FILLER)))
        record["article"] = record["article"] + " " + FILLER * repeats
    return records


def timed(label: str, results: dict, run):
    start = time.perf_counter()
    value = run()
    results[label] = round(time.perf_counter() - start, 1)
    print(f"== {label}: {results[label]} s", flush=True)
    return value


def save_random_model(folder: Path, tokenizer: sl.Tokenizer) -> None:
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config(**SHAPE))
    torch.set_default_dtype(torch.float32)
    model.to_empty(device="cpu").tie_weights()
    model.initialize_weights()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    sl.save_pretrained(model, tokenizer, folder, max_shard_size="400MB")


def train_killed_and_resumed(config_path: Path, out_dir: Path, results: dict) -> None:
    """tools/train.py until checkpoint-000002 exists, SIGKILL, then tools/train.py again to the end."""
    command = [sys.executable, str(ROOT / "tools/train.py"), "--config", str(config_path)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (out_dir / "checkpoint-000002").is_dir():
        if process.poll() is not None:
            raise RuntimeError(f"training ended before its first checkpoint:\n{process.stdout.read()}")
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    results["train until killed"] = round(time.perf_counter() - start, 1)
    steps_before = len((out_dir / "metrics.jsonl").read_text().splitlines())
    print(f"== killed after checkpoint-000002 ({steps_before} steps logged), resuming", flush=True)
    resumed = timed("train resumed to the end", results,
                    lambda: subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    assert "resuming from" in resumed, resumed
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    results["step seconds"] = [round(m["step_seconds"], 1) for m in metrics]
    results["tokens per step"] = [m["tokens"] for m in metrics]
    results["losses"] = [round(m["loss"], 4) for m in metrics]
    # The largest RSS any child reached: the training processes (whole process: interpreter and libraries too).
    results["training peak RSS GB"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9, 2)


def generate_unmerged(model_dir: Path, adapter: Path, records: list[dict], results: dict):
    model, tokenizer = sl.load_pretrained(model_dir, dtype=torch.bfloat16)
    sl.load_adapter(model, adapter)
    messages = scoring_messages(records[0]["profile"], records[0]["title"], records[0]["article"][:400])
    prompt = tokenizer.encode_prompt(messages)
    new = timed("generate 16 tokens, adapters unmerged", results, lambda: sl.generate(
        model, [prompt], max_new_tokens=16, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)[0])
    results["prompt tokens"] = len(prompt)
    results["generated"] = tokenizer.decode(new)
    return model, tokenizer


def llama_cpp_chat(gguf_path: Path, results: dict) -> None:
    """In a child process (a native crash must not end the benchmark): load, answer through the chat
    template embedded in the file, report what came back."""
    code = (
        "import json, sys, time, llama_cpp\n"
        "start = time.perf_counter()\n"
        "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=2048, verbose=False)\n"
        "loaded = time.perf_counter() - start\n"
        "out = llm.create_chat_completion(messages=[{'role': 'system', 'content': sys.argv[2]},"
        " {'role': 'user', 'content': 'Score this article for a marine electrician in Norway.'}],"
        " max_tokens=16, temperature=0.0)\n"
        "print(json.dumps({'load_s': round(loaded, 1), 'total_s': round(time.perf_counter() - start, 1),"
        " 'chat_format': llm.chat_format, 'usage': out['usage'],"
        " 'text': out['choices'][0]['message']['content']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(gguf_path), SYSTEM_PROMPT], capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        results["llama.cpp"] = f"failed (exit {out.returncode}): {out.stderr[-500:]}"
    else:
        results["llama.cpp"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"== llama.cpp: {results['llama.cpp']}", flush=True)


def hf_comparison(results: dict, steps: int) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/step_speed.py"), "--shape", "qwen3-0.6b",
                          "--seq", "1024", "--steps", str(steps), "--dtypes", "bfloat16", "--batch", "1",
                          "--accum", "1"], check=True, capture_output=True, text=True).stdout
    results["step_speed"] = out
    print(out, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/sl_real_shape")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (a checkpoint every 2)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out the HF Trainer + PEFT comparison")
    args = parser.parse_args()
    work = Path(args.work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    results: dict = {"device": f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__}
    tokenizer = qwen3_tokenizer(work)
    model_dir = work / "model"
    timed("save bf16 HF folder (400 MB shards)", results, lambda: save_random_model(model_dir, tokenizer))
    records = long_records(64, tokenizer, 1024)
    write_jsonl(records, work / "train.jsonl")
    out_dir = work / "run"
    config = {"model": str(model_dir), "train_data": str(work / "train.jsonl"), "out_dir": str(out_dir),
              "max_len": 1024, "batch_size": 1, "grad_accum": 2, "max_steps": args.steps, "save_every": 2,
              "dtype": "bfloat16", "lr": 1e-4, "verify_batches": 100, "progress": False}
    config_path = work / "run.toml"
    config_path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    plan = timed("plan", results, lambda: sl.plan(sl.TrainConfig.from_toml(config_path)))
    print(plan, flush=True)
    results["plan"] = {"peak_GB": round(plan.peak / 1e9, 2), "max_batch_size": plan.max_batch_size}
    train_killed_and_resumed(config_path, out_dir, results)
    model, tokenizer = generate_unmerged(model_dir, out_dir / "adapter", records, results)
    timed("merge", results, lambda: sl.merge_dora(model))
    gguf_path = work / "model-q8_0.gguf"
    timed("export q8_0", results, lambda: sl.export_gguf(model, tokenizer, gguf_path, quant="q8_0"))
    results["gguf MB"] = round(gguf_path.stat().st_size / 1e6)
    llama_cpp_chat(gguf_path, results)
    if not args.skip_hf:
        hf_comparison(results, steps=3)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
