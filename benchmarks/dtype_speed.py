"""Seconds per training step of the demo's base phase in float32, bfloat16 autocast and dtype "auto", on
this machine: whether bf16 pays here, and what "auto" chooses.

    python benchmarks/dtype_speed.py [--steps 4]

The demo's model (stratos_lite/demo.toml) and data, batch 8, full fine-tuning, no gradient checkpointing; the
median over `--steps` optimizer steps after two warm-up steps, each dtype in the same process.
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch
from timing import median_seconds

import stratos_lite as sl
from stratos_lite.data.batch import collate
from stratos_lite.demo.config import DemoConfig
from stratos_lite.demo.data import make_demo_data
from stratos_lite.train.device import bf16_is_native
from stratos_lite.train.loss import example_losses


def step_seconds(dtype: torch.dtype, batch: dict, model_config: dict, vocab: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = sl.Qwen3ForCausalLM(sl.Qwen3Config(vocab_size=vocab, **model_config)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = example_losses(model, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, repeats)


def demo_base_phase() -> tuple[DemoConfig, sl.Tokenizer, sl.ScoredDataset]:
    """The demo's configuration (stratos_lite/demo.toml), tokenizer and base-phase data, generated as the demo does."""
    demo = DemoConfig.from_toml()
    with tempfile.TemporaryDirectory() as folder:
        paths = make_demo_data(folder, seed=demo.seed, **demo.data)
        tokenizer = sl.Tokenizer.from_pretrained(paths["tokenizer"])
        data = sl.ScoredDataset.from_jsonl(paths["base"], tokenizer, max_len=demo.base["max_len"])
    return demo, tokenizer, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    demo, tokenizer, data = demo_base_phase()
    batch = collate([data[i] for i in range(demo.base["batch_size"])], tokenizer.pad_id)
    cpu = torch.device("cpu")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{bf16_is_native(cpu)}; batch {tuple(batch['input_ids'].shape)}")
    times = {name: step_seconds(dtype, batch, demo.model, tokenizer.vocab_size, args.steps)
             for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    for name, seconds in times.items():
        print(f"{name:>9}: {seconds:.3f} s/step ({seconds / times['float32']:.2f}x float32)")
    print(f"     auto: {sl.compute_dtype('auto', cpu)}")


if __name__ == "__main__":
    main()
