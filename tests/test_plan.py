"""The plan: its simulated step against the real one, its counts at Qwen3-8B's shape, and --plan's refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from train_child import save_base

import stratos_lite as sl
from stratos_lite.planning.planner import count_parameters
from stratos_lite.planning.report import DataShape
from stratos_lite.planning.simulator import LiveBytes, Simulator, held_tensors, simulate_micro_batch
from stratos_lite.train.builder import apply_training_settings
from stratos_lite.train.device import attention_kernel

TOOLS = Path(__file__).resolve().parent.parent / "tools"
TINY = sl.Qwen3Config.from_dict(tiny_config())
QWEN3_8B = sl.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128)
SETTINGS = [
    dict(mode="dora", dtype="float32", checkpoint_policy="layer"),
    dict(mode="dora", dtype="bfloat16", checkpoint_policy="mlp"),
    dict(mode="dora", dtype="float32", gradient_checkpointing=False),
    dict(mode="full", dtype="float32", checkpoint_policy="layer"),
    dict(mode="full", dtype="bfloat16", gradient_checkpointing=False),
    dict(mode="full", dtype="float32", checkpoint_policy="layer", attention_kernel="math"),
    dict(mode="dora", dtype="bfloat16", checkpoint_policy="mlp", loss_chunk=7),  # the vocabulary 7 at a time
    dict(mode="full", dtype="float32", checkpoint_policy="mlp", loss_chunk=5),
    dict(mode="dora", dtype="bfloat16", checkpoint_policy="mlp", base_quant="nf4"),  # dequantized per layer
    dict(mode="lora", dtype="bfloat16", checkpoint_policy="layer", base_quant="nf4", rslora=True),  # QLoRA
]
ONE_STEP_SETTINGS = SETTINGS[:4] + SETTINGS[5:]
INPUTS_LEFT_OUT = 12_000  # bytes: the batch of 2 x 48 tokens and the loss scalars, which the plan does not count


def simulator(config: sl.TrainConfig, dtype: torch.dtype, attention: str = "sdpa") -> Simulator:
    return Simulator(TINY, config, torch.device("cpu"), dtype, attention)


def real_model(config: sl.TrainConfig) -> sl.Qwen3ForCausalLM:
    """The model a run of `config` trains on TINY's shape, with real (random) weights: the builder's, as the
    plan's fake one is."""
    torch.manual_seed(0)
    model = sl.prepare_model(config, torch.device("cpu"), weights=False, model_config=TINY)
    apply_training_settings(model, config)
    return model


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_simulated_micro_batch_holds_the_bytes_a_real_one_does(settings):
    config = sl.TrainConfig(rank=4, alpha=8, **settings)
    dtype = sl.compute_dtype(config.dtype, torch.device("cpu"))
    fake = simulator(config, dtype, config.attention_kernel).micro_batch(3, 40, 25, with_grads=False)
    with attention_kernel(config.attention_kernel):  # as the Trainer runs a micro-batch
        real = simulate_micro_batch(real_model(config), 3, 40, 25, dtype, config.loss_chunk)
    assert fake == real
    assert 0 < fake.saved < fake.peak


def synthetic_examples(count: int, seq: int, completion: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, TINY.vocab_size, (seq,), generator=gen)
        labels = ids.clone()
        labels[: seq - completion] = -100
        rows.append({"input_ids": ids, "labels": labels, "weight": 1.0, "band": 0})
    return rows


@pytest.mark.parametrize("settings", ONE_STEP_SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_predicted_peak_is_the_live_peak_of_real_training(settings, tmp_path):
    """Two real optimizer steps with accumulation, every tensor the Trainer creates counted as it lives:
    the peak is the plan's (weights, adapters, gradients, AdamW state, activations) within 1 %, or within
    INPUTS_LEFT_OUT on the smallest of these tiny models: what the plan leaves out is the step's token ids,
    labels and loss scalars (9.5 KB here, whatever the model)."""
    seq, completion = 48, 12
    config = sl.TrainConfig(out_dir=str(tmp_path), rank=4, alpha=8, batch_size=2, grad_accum=2, max_steps=2,
                            max_len=seq, band_sampling=False, verify_batches=0, save_every=10**9, progress=False,
                            **settings)
    data = DataShape(examples=8, longest=seq, longest_completion=completion, mean_tokens=seq, source="test")
    predicted = sl.plan(config, model_config=TINY, data=data, memory="1GB")
    model = real_model(config)
    resident = sum(p.numel() * p.element_size() for p in held_tensors(model))  # a 4-bit base's codes too
    tracker = LiveBytes()
    with tracker:
        sl.Trainer(model, synthetic_examples(8, seq, completion), config).train()
    assert abs(resident + tracker.peak - predicted.peak) <= max(0.01 * predicted.peak, INPUTS_LEFT_OUT)
    assert predicted.fits and predicted.tokens_per_step == 2 * 2 * seq and predicted.steps_per_epoch == 2


def test_largest_batch_is_the_last_one_under_the_memory():
    data = DataShape(examples=64, longest=32, longest_completion=8, mean_tokens=32, source="test")

    def peak(batch, memory="1GB"):
        config = sl.TrainConfig(rank=4, alpha=8, batch_size=batch, grad_accum=2, dtype="float32")
        return sl.plan(config, model_config=TINY, data=data, memory=memory)

    three, four = peak(3).peak, peak(4).peak
    between = peak(1, memory=(three + four) // 2)
    assert between.max_batch_size == 3 and between.fits
    too_big = peak(4, memory=(three + four) // 2)
    assert not too_big.fits and "batch_size = 3 with grad_accum = 3" in too_big.advice()


def test_on_a_gpu_the_largest_batch_and_row_are_judged_by_the_allocators_reserve(monkeypatch):
    """What an OOM on a GPU depends on is the caching allocator's segments plus the BLAS workspace, not the
    live bytes: the largest batch_size (and packed row) the plan offers must fit by that figure."""
    import importlib

    plan_module = importlib.import_module("stratos_lite.planning.planner")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the plan asks
    monkeypatch.setattr(plan_module, "training_kernel", lambda *args: "flash")
    monkeypatch.setattr(plan_module, "blas_workspace", lambda device: 8 * 2**20 if device.type == "cuda" else 0)
    data = DataShape(examples=64, longest=256, longest_completion=64, mean_tokens=256, source="test",
                     lengths=[256] * 64, completion_share=0.25)

    long_context = sl.Qwen3Config.from_dict(tiny_config(max_position_embeddings=4096))  # rows past 256 searched

    def gpu_plan(batch, memory, **settings):
        config = sl.TrainConfig(rank=4, alpha=8, batch_size=batch, grad_accum=2, dtype="float32", **settings)
        return sl.plan(config, model_config=long_context, data=data, memory=memory, device="cuda")

    eight, nine = gpu_plan(8, "1GiB"), gpu_plan(9, "1GiB")
    memory = (eight.needed + nine.needed) // 2
    assert nine.peak < memory < nine.needed  # the live peak alone would have offered batch 9
    assert gpu_plan(1, memory).max_batch_size == 8
    packed = gpu_plan(1, memory, packing=True, pack_tokens=256).max_row_tokens
    assert gpu_plan(1, memory, packing=True, pack_tokens=packed).needed <= memory
    assert gpu_plan(1, memory, packing=True, pack_tokens=packed * 102 // 100).needed > memory


def test_qwen3_8b_counts_are_exact():
    counts = count_parameters(QWEN3_8B, sl.TrainConfig(rank=16, dtype="bfloat16"))
    assert counts.base == 8_190_735_360
    assert counts.trainable == 45_047_808
    assert counts.weight_bytes == 2 * 8_190_735_360 and counts.trainable_bytes == 4 * 45_047_808


def write_run(tmp_path, demo_dir) -> Path:
    save_base(str(demo_dir), tmp_path / "base")
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{tmp_path / "base"}"\ntrain_data = "{demo_dir / "train.jsonl"}"\nrank = 2\n'
                      f'alpha = 4\nmax_len = 256\nmax_steps = 3\nbatch_size = 2\ngrad_accum = 2\n'
                      f'dtype = "float32"\nverify_batches = 0\nprogress = false\nout_dir = "{tmp_path / "out"}"\n')
    return config


def train_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / "train.py"), *args], capture_output=True, text=True)


def test_plan_flag_prints_the_plan_and_a_probe(tmp_path, demo_dir):
    config = write_run(tmp_path, demo_dir)
    result = train_tool("--config", str(config), "--plan", "--probe", "2")
    assert result.returncode == 0, result.stderr
    for words in ("predicted peak", "fits", "largest that fits: batch_size", "tokens per optimizer step",
                  "steps per epoch", "s per step", "for 3 steps"):
        assert words in result.stdout
    assert not (tmp_path / "out").exists()  # a plan trains nothing in out_dir


def test_run_that_does_not_fit_stops_before_loading(tmp_path, demo_dir):
    config = write_run(tmp_path, demo_dir)
    for shard in (tmp_path / "base").glob("*.safetensors"):
        shard.write_bytes(b"not weights")  # loading would fail on these: the plan must stop first
    result = train_tool("--config", str(config), "--memory", "1MB")
    assert result.returncode == 2
    assert "does not fit" in result.stderr and "predicted peak" in result.stderr and "to fit:" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_activations_without_checkpointing_are_those_of_a_run_without_it():
    """A run without checkpointing reports its own activations as the unchecked figure (not simulated twice):
    the bytes a simulation without checkpointing saves; with checkpointing the figure is larger."""
    data = DataShape(examples=64, longest=40, longest_completion=10, mean_tokens=40, source="test")
    plans = {}
    for checkpointing in (False, True):
        config = sl.TrainConfig(rank=4, alpha=8, dtype="float32", batch_size=3, grad_accum=2,
                                gradient_checkpointing=checkpointing)
        plans[checkpointing] = sl.plan(config, model_config=TINY, data=data, memory="1GB")
    unchecked = simulator(config, torch.float32).saved_without_checkpointing(3, 40, 30)
    assert plans[False].activations_no_checkpointing == plans[False].activations == unchecked
    assert plans[True].activations < plans[True].activations_no_checkpointing


def test_the_fit_check_simulates_one_micro_batch_and_the_rest_when_read(monkeypatch):
    """What the train command's check needs is the run's own micro-batch; the searches and the run without
    checkpointing are simulated when the plan is read (printed), once."""
    simulated, micro_batch = [], Simulator.micro_batch

    def counted(self, batch, seq, *args, **kwargs):
        simulated.append((batch, seq))
        return micro_batch(self, batch, seq, *args, **kwargs)

    monkeypatch.setattr(Simulator, "micro_batch", counted)
    data = DataShape(examples=8, longest=32, longest_completion=8, mean_tokens=32, source="test")
    the_plan = sl.plan(sl.TrainConfig(rank=4, alpha=8, dtype="float32", batch_size=2), model_config=TINY, data=data,
                       memory="1GB")
    assert the_plan.fits and simulated == [(2, 32)]
    text = the_plan.to_text()
    assert len(simulated) > 2 and f"batch_size {the_plan.max_batch_size} at 32 tokens" in text
    read = len(simulated)
    assert the_plan.to_text() == text and len(simulated) == read  # worked out once


def test_a_gpu_plan_without_a_gpu_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = r"^device 'cuda': this torch .* sees no CUDA or ROCm GPU; .*memory="
    with pytest.raises(ValueError, match=expected) as caught:
        sl.plan(sl.TrainConfig(), model_config=TINY, device="cuda")
    assert "\n" not in str(caught.value)


def test_plan_on_several_ranks_gives_each_strategy_per_rank():
    data = DataShape(examples=64, longest=32, longest_completion=8, mean_tokens=32, source="test")
    # Layers hold the weight; a context of 64 keeps the searches that the text reports short.
    deep = sl.Qwen3Config.from_dict(tiny_config(num_hidden_layers=6, vocab_size=128, max_position_embeddings=64))
    plans = {strategy: sl.plan(sl.TrainConfig(rank=4, alpha=8, dtype="float32", strategy=strategy),
                               model_config=deep, data=data, memory="8MB", world_size=2)
             for strategy in ("ddp", "fsdp")}
    assert plans["ddp"].per_rank == plans["fsdp"].per_rank and set(plans["ddp"].per_rank) == {"ddp", "fsdp"}
    for strategy, the_plan in plans.items():
        assert the_plan.peak == the_plan.per_rank[strategy]
        assert "per rank on 2 ranks: ddp" in the_plan.to_text()
    # DDP keeps a whole replica plus its gradient buckets; FSDP a half of every shardable byte.
    one = sl.plan(sl.TrainConfig(rank=4, alpha=8, dtype="float32"), model_config=deep, data=data, memory="8MB")
    assert plans["ddp"].peak == one.peak + one.gradients
    assert plans["fsdp"].peak < plans["ddp"].peak


def test_a_gpu_whose_sdpa_trains_on_the_math_kernel_is_planned_with_it(monkeypatch):
    """Navi31 without AOTriton's experimental kernels: SDPA's training call runs the math kernel, so the plan
    simulates it (its T x T scores counted) and says why; a fused kernel leaves the setting as it is."""
    import importlib

    plan_module = importlib.import_module("stratos_lite.planning.planner")

    config = sl.TrainConfig(dtype="bfloat16")
    gpu = torch.device("cuda")
    for kernel, expected in (("math", "math"), ("efficient", "sdpa"), ("flash", "sdpa")):
        monkeypatch.setattr(plan_module, "training_kernel", lambda *args, kernel=kernel: kernel)
        attention, note = plan_module.planned_attention(config, TINY, gpu, torch.bfloat16)
        assert attention == expected and (note is not None) == (kernel == "math")
    monkeypatch.setattr(plan_module, "training_kernel", lambda *args: "math")
    assert "T x T attention scores are counted" in plan_module.planned_attention(config, TINY, gpu, torch.bfloat16)[1]
    assert plan_module.planned_attention(config, TINY, torch.device("cpu"), torch.bfloat16) == ("sdpa", None)


def test_math_attention_kernel_counts_its_probabilities():
    """The math kernel keeps each layer's (batch x heads x length x length) softmax for the backward; the
    plan counts it (the sdpa kernel keeps a row statistic instead)."""
    batch, seq = 3, 40
    saved = {kernel: simulator(sl.TrainConfig(mode="full", dtype="float32", gradient_checkpointing=False,
                                              attention_kernel=kernel), torch.float32, kernel)
             .micro_batch(batch, seq, 25, with_grads=False).saved for kernel in ("sdpa", "math")}
    probabilities = TINY.num_hidden_layers * batch * TINY.num_attention_heads * seq * seq * 4
    assert saved["math"] - saved["sdpa"] >= probabilities


def test_caching_allocator_model_reserves_segments_as_pytorchs_does():
    """The rules of c10/cuda/CUDACachingAllocator.cpp, one by one (allocator_model.py)."""
    from stratos_lite.planning.allocator import CachingAllocator

    mib = 2**20
    allocator = CachingAllocator()
    tiny = allocator.allocate(1000)  # small pool: a 2 MiB segment, 512-byte blocks
    assert allocator.reserved == 2 * mib
    allocator.allocate(3000)  # split off the same segment
    assert allocator.reserved == 2 * mib
    first, second = allocator.allocate(5 * mib), allocator.allocate(5 * mib)  # under 10 MiB: one 20 MiB segment
    assert allocator.reserved == 22 * mib
    big = allocator.allocate(int(12.3 * mib))  # 10 MiB and over: its own segment, rounded up to 2 MiB
    assert allocator.reserved == 36 * mib
    allocator.free(first)
    allocator.free(second)  # merged with its free neighbours: the 20 MiB segment is one free block again
    reused = allocator.allocate(9 * mib)
    assert allocator.reserved == 36 * mib
    allocator.free(reused)
    allocator.free(big)
    allocator.allocate(30 * mib)  # nothing cached is large enough: a new segment; nothing is given back
    assert allocator.reserved == allocator.peak_reserved == 66 * mib
    allocator.free(tiny)
    assert allocator.reserved == 66 * mib


def test_caching_allocator_blocks_tile_their_segments_through_any_sequence():
    """Seeded random allocations and frees: each segment's blocks, followed by their neighbour links, cover it
    in address order with no two free blocks side by side (freed neighbours merge), and the segments add up to
    what is reserved; all freed, each segment is one free block that serves a request of its size again."""
    import random

    from stratos_lite.planning.allocator import CachingAllocator

    def segments(heads) -> int:
        total = 0
        for head in heads.values():
            block, end = head, 0
            while block is not None:
                assert block.offset == end and (block.prev is None or block.prev.next is block)
                assert not (block.free and block.prev is not None and block.prev.free)
                end, block = end + block.size, block.next
            total += end
        return total

    rng = random.Random(0)
    for _ in range(20):
        allocator, live, heads = CachingAllocator(), [], {}
        for _ in range(120):
            if live and rng.random() < 0.45:
                allocator.free(live.pop(rng.randrange(len(live))))
            else:
                block = allocator.allocate(rng.choice([rng.randint(1, 2**20), rng.randint(2**20, 24 * 2**20)]))
                assert not block.free
                live.append(block)
                heads.setdefault(block.segment, block if block.offset == 0 else None)  # a new segment's first
            assert segments(heads) == allocator.reserved
        for block in live:
            allocator.free(block)
        assert all(head.free and head.next is None for head in heads.values())
        largest = max(heads.values(), key=lambda head: head.size)
        reserved = allocator.reserved
        if largest.size > 2**20:  # a large-pool segment: the whole of it is reused, nothing new reserved
            assert allocator.allocate(largest.size) is largest and allocator.reserved == reserved


def test_blas_workspace_reads_pytorchs_setting():
    from stratos_lite.planning.allocator import blas_workspace, workspace_config

    assert workspace_config(":4096:8", 0) == 32 * 2**20
    assert workspace_config(":4096:2:16:8", 0) == 8 * 2**20 + 128 * 2**10
    assert workspace_config(None, 7) == 7 and workspace_config("nonsense", 7) == 7
    assert blas_workspace(torch.device("cpu")) == 0


def test_plan_counts_the_allocators_segments_and_judges_a_gpu_by_them():
    data = DataShape(examples=64, longest=48, longest_completion=12, mean_tokens=40, source="test")
    the_plan = sl.plan(sl.TrainConfig(rank=4, alpha=8, dtype="float32", batch_size=4), model_config=TINY, data=data,
                       memory="1GiB")
    assert the_plan.peak <= the_plan.reserved < the_plan.peak + 64 * 2**20  # whole segments over the live bytes
    assert "reserved by PyTorch's caching allocator" in the_plan.to_text() and the_plan.needed == the_plan.peak
    import dataclasses

    on_gpu = dataclasses.replace(the_plan, device="cuda", workspace=8 * 2**20,
                                 memory=the_plan.peak + (the_plan.reserved - the_plan.peak) // 2)
    assert on_gpu.needed == on_gpu.reserved + 8 * 2**20 and not on_gpu.fits  # live bytes fit, segments do not
    assert "DOES NOT FIT" in on_gpu.to_text()


def test_offloaded_activations_move_from_the_device_line_to_the_host_line():
    """Under whole-layer checkpointing each layer keeps its input (plus cos and sin, shared by the layers):
    offloaded, those go to the host line, and the device keeps about the two the backward has in hand."""
    data = DataShape(examples=8, longest=40, longest_completion=10, mean_tokens=40, source="test")
    plans = {offload: sl.plan(sl.TrainConfig(rank=4, alpha=8, batch_size=3, dtype="float32",
                                             offload_activations=offload), model_config=TINY, data=data, memory="1GB")
             for offload in (False, True)}
    layer_input = 3 * 40 * TINY.hidden_size * 4
    rope = 2 * 3 * 40 * TINY.head_dim * 4
    assert plans[True].host_activations == TINY.num_hidden_layers * layer_input + rope
    assert plans[False].host_activations == 0 and "on the host" in str(plans[True])
    assert plans[True].activations <= plans[False].activations - layer_input
