"""A small training run in its own process (for the kill/resume and torchrun tests).

    python tests/train_child.py DATA_DIR OUT_DIR [--slow] [--batch-size B] [--dropout P] [--steps N]
                                [--mode dora|full] [--strategy ddp|fsdp] [--cpu-offload] [--nan]
                                [--pack-tokens N (packing on, rows of at most N tokens)] [--loss-chunk N]
"""

import argparse
import time

import torch

import stratos_lite as sl
from stratos_lite.commands.errors import run
from stratos_lite.config import TrainConfig
from stratos_lite.train.strategy import exit_distributed
from stratos_lite.train.trainer import Trainer


class SlowDataset(torch.utils.data.Dataset):
    """Sleeps on every item, so the parent has time to kill the run between two checkpoints."""

    def __init__(self, dataset):
        self.dataset, self.bands, self.band_ids = dataset, dataset.bands, dataset.band_ids
        self.lengths = dataset.lengths

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        time.sleep(0.02)
        return self.dataset[index]


def build(data_dir: str, dropout: float, mode: str = "dora"):
    tokenizer = sl.Tokenizer.from_pretrained(f"{data_dir}/tokenizer")
    dataset = sl.ScoredDataset.from_jsonl(f"{data_dir}/train.jsonl", tokenizer, max_len=256)
    config = sl.Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = sl.Qwen3ForCausalLM(config)
    if mode == "dora":
        sl.apply_dora(model, rank=4, alpha=8, dropout=dropout)
    return model, dataset, tokenizer


def save_base(data_dir: str, folder) -> None:
    """The model of `build` with its fresh adapter merged, saved as an HF folder for tools/train.py runs."""
    model, _, tokenizer = build(data_dir, dropout=0.0)
    sl.merge_dora(model)
    sl.save_pretrained(model, tokenizer, folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--slow", action="store_true")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--mode", default="dora", choices=["dora", "full"])
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--nan", action="store_true", help="poison layer 1's MLP output (the NaN guard's test)")
    parser.add_argument("--pack-tokens", type=int, default=0, help="packing = true with rows of this many tokens")
    parser.add_argument("--loss-chunk", type=int, default=0, help="the vocabulary this many positions at a time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, dataset, tokenizer = build(args.data_dir, args.dropout, args.mode)
    if args.nan:
        model.model.layers[1].mlp.register_forward_hook(lambda module, inputs, out: out * float("nan"))
    config = TrainConfig(out_dir=args.out_dir, batch_size=args.batch_size, grad_accum=2, lr=1e-3, max_steps=args.steps,
                         save_every=2, keep_checkpoints=2, dtype="float32", verify_batches=0, progress=False,
                         mode=args.mode, strategy=args.strategy, cpu_offload=args.cpu_offload,
                         packing=args.pack_tokens > 0, pack_tokens=args.pack_tokens or None,
                         loss_chunk=args.loss_chunk)
    Trainer(model, SlowDataset(dataset) if args.slow else dataset, config, pad_id=tokenizer.pad_id).train()
    exit_distributed()


if __name__ == "__main__":
    run(main)  # as the tools do: a run stopped by a signal exits with 128 + its number
