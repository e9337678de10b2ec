"""DoRA cost: one linear's training step (ours, PEFT DoRA, plain PEFT LoRA) and decoding unmerged vs merged.

    python benchmarks/dora_speed.py [--repeats 15]

Training step = forward + backward + a small in-place update of the adapter (so DoRA's cached norm must
be recomputed every step, as in real training). Activation memory = bytes autograd saves for backward.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import stratos_lite as sl
from stratos_lite.model.dora import DoRALinear

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds

IN, OUT, TOKENS, RANK, ALPHA, DROPOUT = 1024, 3072, 1024, 16, 32, 0.05


def peft_linear(base: nn.Linear, use_dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, use_dora=use_dora, target_modules=["proj"])
    return get_peft_model(nn.Sequential(OrderedDict(proj=base)), config).train()


def frozen_linear(weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(IN, OUT, bias=False)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    return linear


def saved_bytes(step) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during `step`'s forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def layer_step(layer: nn.Module, x: torch.Tensor, autocast: bool):
    trainable = [p for p in layer.parameters() if p.requires_grad]

    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
        with ctx:
            y = layer(x)
        y.float().square().mean().backward()
        with torch.no_grad():
            for p in trainable:
                p.sub_(1e-6 * p.grad)
                p.grad = None

    return step


def bench_layer(repeats: int) -> None:
    print(f"one linear, in {IN}, out {OUT}, {TOKENS} tokens, r{RANK}, dropout {DROPOUT}: forward + backward")
    print(f"{'mode':<14}{'layer':<14}{'ms/step':>9}{'x LoRA':>8}{'x PEFT':>8}{'saved MB':>10}")
    for mode in ("fp32", "bf16-autocast"):
        base_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        torch.manual_seed(0)
        weight = torch.randn(OUT, IN) * 0.02
        x = torch.randn(TOKENS, IN).to(base_dtype)

        ours = DoRALinear(frozen_linear(weight, base_dtype), RANK, ALPHA, DROPOUT).train()
        with torch.no_grad():
            ours.lora_B.normal_(0, 0.01)
        layers = {"PEFT LoRA": peft_linear(frozen_linear(weight, base_dtype), False),
                  "PEFT DoRA": peft_linear(frozen_linear(weight, base_dtype), True), "stratos DoRA": ours}
        results = {}
        for name, layer in layers.items():
            step = layer_step(layer, x, autocast=mode != "fp32")
            results[name] = (median_seconds(step, repeats), saved_bytes(step))
        for name, (seconds, saved) in results.items():
            print(f"{mode:<14}{name:<14}{seconds * 1e3:>9.1f}{seconds / results['PEFT LoRA'][0]:>8.2f}"
                  f"{seconds / results['PEFT DoRA'][0]:>8.2f}{saved / 1e6:>10.1f}")


def bench_decode(repeats: int) -> None:
    config = sl.Qwen3Config(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    torch.manual_seed(0)
    model = sl.Qwen3ForCausalLM(config).eval()
    sl.apply_dora(model, rank=RANK, alpha=ALPHA, dropout=DROPOUT)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, DoRALinear):
                layer.lora_B.normal_(0, 0.01)
    prompts = [list(range(1, 129))]
    run = lambda: sl.generate(model, prompts, max_new_tokens=64)
    unmerged = median_seconds(run, repeats)
    sl.merge_dora(model)
    merged = median_seconds(run, repeats)
    print("\ngreedy decode, batch 1, prompt 128, 64 new tokens, fp32, the step-speed model (hidden 512, 4 layers)")
    print(f"merged {64 / merged:.0f} tok/s, unmerged DoRA {64 / unmerged:.0f} tok/s: "
          f"unmerged takes {unmerged / merged:.2f}x the merged time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_layer(args.repeats)
    bench_decode(max(3, args.repeats // 3))


if __name__ == "__main__":
    main()
