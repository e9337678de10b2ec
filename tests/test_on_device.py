"""The checks that must hold on whatever device trains: STRATOS_TEST_DEVICE (default cpu; the device check
runs this file with cuda on a GPU machine, where ROCm also answers to "cuda").

Each compares the device against an oracle or against the CPU: logits against transformers, a DoRA layer
against PEFT, a trainer step resumed from a checkpoint against one taken straight, a GGUF exported from
the device model against one exported from the CPU copy, greedy generation (in order and from a CUDA graph)
against the CPU's tokens.
"""

import os
import signal

import numpy as np
import pytest
import torch
from conftest import hf_model, tiny_config, write_hf_checkpoint
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch import nn

import stratos_lite as sl
from stratos_lite.export.gguf_file import export_gguf
from stratos_lite.model.dora import DoRALinear
from stratos_lite.train.preemption import Interrupted

DEVICE = torch.device(os.environ.get("STRATOS_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip(f"STRATOS_TEST_DEVICE={DEVICE} but torch sees no GPU", allow_module_level=True)


@pytest.fixture(autouse=True)
def exact_matmuls():
    """fp32 matmuls in fp32 on the GPU (no TF32), so that fp32 comparisons mean what they say."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def test_logits_equal_transformers_on_the_device(tmp_path):
    config = tiny_config(head_dim=24)
    reference = write_hf_checkpoint(tmp_path, config)
    model = sl.load_model(tmp_path, dtype=torch.float32).to(DEVICE)
    ids = torch.randint(0, config["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids.to(DEVICE)).cpu()
        theirs = reference(ids).logits
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4


def test_dora_layer_equals_peft_on_the_device():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40, bias=False))
    ours = DoRALinear(nn.Linear(48, 40, bias=False), rank=4, alpha=8)
    with torch.no_grad():
        ours.base_layer.weight.copy_(base[0].weight)
    reference = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["0"]))
    layer = reference.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(1.05)
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
        ours.lora_magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    ours.to(DEVICE)
    x = torch.randn(3, 7, 48)
    assert (ours(x.to(DEVICE)).detach().cpu() - reference(x).detach()).abs().max() < 1e-5


def test_resumed_trainer_steps_equal_straight_ones_on_the_device(demo_dir, tmp_path):
    tokenizer = sl.Tokenizer.from_pretrained(demo_dir / "tokenizer")
    data = sl.ScoredDataset.from_jsonl(demo_dir / "train.jsonl", tokenizer, max_len=256)

    def run(out_dir, stop_after=None):
        torch.manual_seed(0)
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config(
            vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)).to(DEVICE)
        sl.apply_dora(model, rank=4, alpha=8, dropout=0.1)
        config = sl.TrainConfig(out_dir=str(out_dir), max_steps=4, batch_size=2, grad_accum=2, lr=1e-3,
                                dtype="float32", save_every=3, verify_batches=0, progress=False,
                                gradient_checkpointing=False)
        trainer = sl.Trainer(model, data, config, pad_id=tokenizer.pad_id)
        if stop_after:  # a SIGTERM during that step, as a preempted job gets: finish it, checkpoint, stop
            take_step, taken = trainer.step, []

            def step_then_signal(micro_batches, optimizer):
                result = take_step(micro_batches, optimizer)
                taken.append(1)
                if len(taken) == stop_after:
                    os.kill(os.getpid(), signal.SIGTERM)
                return result

            trainer.step = step_then_signal
            with pytest.raises(Interrupted):
                trainer.train()
        else:
            trainer.train()
        return model

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", stop_after=2)
    resumed = run(tmp_path / "resumed")
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        if a.requires_grad:
            # bitwise on a CPU; a GPU reduces in a different order between runs unless deterministic = true
            assert torch.allclose(a, b, rtol=0, atol=0 if DEVICE.type == "cpu" else 1e-4), name


def test_export_from_a_device_model_equals_the_cpu_export(tmp_path, tokenizer):
    write_hf_checkpoint(tmp_path / "hf", tiny_config(vocab_size=512))
    model = sl.load_model(tmp_path / "hf", dtype=torch.float32)
    sl.apply_dora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    on_cpu = export_gguf(model, tokenizer, tmp_path / "cpu.gguf", quant="q8_0", modelfile=False)
    on_device = export_gguf(model.to(DEVICE), tokenizer, tmp_path / "device.gguf", quant="q8_0", modelfile=False)
    # The DoRA merge runs where the model is: a GPU's norm may differ from the CPU's in the last bit, and a value
    # then rounds to the next q8_0 step. So the files agree to one step of each block (bitwise on a CPU).
    for ours, theirs in zip(GGUFReader(on_device).tensors, GGUFReader(on_cpu).tensors, strict=True):
        assert ours.name == theirs.name and ours.tensor_type == theirs.tensor_type
        if DEVICE.type == "cpu" or ours.tensor_type != GGMLQuantizationType.Q8_0:
            assert np.array_equal(ours.data, theirs.data), ours.name
            continue
        step = np.maximum(q8_0_scales(ours.data), q8_0_scales(theirs.data))
        difference = np.abs(dequantize(ours.data, ours.tensor_type) - dequantize(theirs.data, theirs.tensor_type))
        assert (difference.reshape(-1, 32) <= step.reshape(-1, 1) * 1.0001).all(), ours.name


def q8_0_scales(blocks: np.ndarray) -> np.ndarray:
    """Each q8_0 block's scale d (its first two bytes, fp16): one quantization step of the block's values."""
    return blocks.reshape(-1, 34)[:, :2].copy().view(np.float16).astype(np.float32).ravel()


def test_greedy_generation_on_the_device_equals_the_cpu():
    reference = hf_model(tiny_config())
    model = sl.Qwen3ForCausalLM(sl.Qwen3Config.from_dict(reference.config.to_dict()))
    model.load_state_dict(reference.state_dict(), strict=False)
    prompts = [[5, 9, 23, 7], [11, 4, 2, 8, 16, 3]]
    on_cpu = sl.generate(model.eval(), prompts, max_new_tokens=12)
    on_device = sl.generate(model.to(DEVICE), prompts, max_new_tokens=12)
    assert on_device == on_cpu
    # Fixed-shape steps, replayed from a CUDA graph on a GPU (the first is a warm-up, the second captured).
    assert sl.generate(model, prompts, max_new_tokens=12, cuda_graph=True) == on_cpu
