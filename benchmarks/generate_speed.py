"""Greedy decoding speed: stratos_lite.generate against transformers' generate on the same weights and
prompts (batch 1 and 8, fp32 and bf16), then evaluation throughput with DoRA adapters merged vs unmerged.

    python benchmarks/generate_speed.py [--prompt 128] [--new 64] [--repeats 3]

The model is the trainer benchmark's (hidden 512, 4 layers, vocab 8192). Every run generates exactly
`--new` tokens (no stop token), so both sides do the same work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import stratos_lite as sl

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)


def prompts(batch: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return [torch.randint(10, SHAPE["vocab_size"], (length - 3 * i,), generator=gen).tolist() for i in range(batch)]


def hf_generate(model, batch_prompts: list[list[int]], new: int):
    longest = max(map(len, batch_prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in batch_prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch_prompts])
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, eos_token_id=None)


def bench_generate(folder: str, prompt: int, new: int, repeats: int) -> None:
    import transformers

    print(f"greedy decode, prompt {prompt} (batch rows 3 tokens shorter each), {new} new tokens, tokens/s")
    print(f"{'dtype':<10}{'batch':>6}{'transformers':>14}{'stratos_lite':>14}{'ratio':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        ours = sl.load_model(folder, dtype=dtype)
        for batch in (1, 8):
            batch_prompts = prompts(batch, prompt)
            theirs = median_seconds(lambda: hf_generate(hf, batch_prompts, new), repeats)  # noqa: B023
            mine = median_seconds(lambda: sl.generate(ours, batch_prompts, max_new_tokens=new), repeats)  # noqa: B023
            tokens = batch * new
            print(f"{str(dtype).removeprefix('torch.'):<10}{batch:>6}{tokens / theirs:>14.0f}{tokens / mine:>14.0f}"
                  f"{theirs / mine:>7.2f}x")


def bench_eval_throughput(folder: str, prompt: int, new: int, repeats: int) -> None:
    model = sl.load_model(folder, dtype=torch.float32)
    sl.apply_dora(model, rank=16, alpha=32, dropout=0.05)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, sl.DoRALinear):
                layer.lora_B.normal_(0, 0.01)
    rows = prompts(32, prompt)

    def evaluate_all():
        for start in range(0, len(rows), 8):
            sl.generate(model, rows[start:start + 8], max_new_tokens=new)

    unmerged = median_seconds(evaluate_all, repeats)
    sl.merge_dora(model)
    merged = median_seconds(evaluate_all, repeats)
    print(f"\nevaluation throughput, 32 examples in batches of 8, fp32: merged {32 / merged:.2f} examples/s, "
          f"unmerged DoRA {32 / unmerged:.2f} examples/s; unmerged takes {unmerged / merged:.2f}x the merged time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        sl.save_pretrained(sl.Qwen3ForCausalLM(sl.Qwen3Config(**SHAPE)), None, folder, dtype=torch.float32)
        bench_generate(folder, args.prompt, args.new, args.repeats)
        bench_eval_throughput(folder, args.prompt, args.new, args.repeats)


if __name__ == "__main__":
    main()
