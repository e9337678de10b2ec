"""Packing: per-example logits and the step's gradient as unpacked, no attention or target across examples,
resume, two ranks with uneven rows, and bad settings."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_fsdp import final_tensors, free_port, losses
from test_trainer import child, quick_config
from train_child import build

import stratos_lite as sl
from stratos_lite.config import ConfigError
from stratos_lite.data.packing import collate_packed, first_fit_decreasing, pack_step
from stratos_lite.data.sampler import sampler_for
from stratos_lite.model.attention import Segments
from stratos_lite.train.checkpoint import checkpoints
from stratos_lite.train.loss import example_losses
from stratos_lite.train.trainer import Trainer


def tiny_model(seed: int = 0) -> sl.Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = sl.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return sl.Qwen3ForCausalLM(config).eval()


def random_examples(lengths, seed=0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    items = []
    for index, length in enumerate(lengths):
        ids = torch.randint(0, 300, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 2] = -100  # the second half is the completion
        items.append({"input_ids": ids, "labels": labels, "weight": 0.5 + index})
    return items


def test_first_fit_decreasing_fills_rows_with_whole_examples():
    lengths = [7, 3, 9, 2, 5, 5, 1, 8]
    rows = first_fit_decreasing(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows) and len(rows) == 4  # 40 tokens: 4 rows of 10
    assert all(row == sorted(row) for row in rows)
    with pytest.raises(ValueError, match="an example of 11 tokens does not fit a row of 10"):
        first_fit_decreasing([11], 10)


def test_packed_logits_equal_unpacked_logits():
    model, items = tiny_model(), random_examples([13, 5, 21, 8])
    row = collate_packed(items)
    with torch.no_grad():
        packed = model(row.input_ids, position_ids=row.position_ids, attention_mask=row.segments)[0]
        start = 0
        for item in items:
            alone = model(item["input_ids"][None])[0]
            assert torch.allclose(packed[start:start + len(alone)], alone, atol=1e-5, rtol=1e-5)
            start += len(alone)


def test_no_attention_or_target_crosses_an_example_boundary():
    model, items = tiny_model(), random_examples([9, 12, 7])
    row = collate_packed(items)
    changed = [dict(item) for item in items]
    changed[1] = {**items[1], "input_ids": (items[1]["input_ids"] + 1) % 300}
    other = collate_packed(changed)
    with torch.no_grad():
        before = model(row.input_ids, position_ids=row.position_ids, attention_mask=row.segments)[0]
        after = model(other.input_ids, position_ids=other.position_ids, attention_mask=other.segments)[0]
    assert torch.equal(before[:9], after[:9]) and torch.equal(before[21:], after[21:])  # examples 0 and 2 unmoved
    assert not torch.allclose(before[9:21], after[9:21])
    # The first token of each example is never a target: the last position of the one before predicts nothing.
    assert row.labels[0, [0, 9, 21]].tolist() == [-100, -100, -100]
    losses_before, losses_after = example_losses(model, row), example_losses(model, other)
    assert losses_before[0] == losses_after[0] and losses_before[2] == losses_after[2]
    assert row.position_ids[0].tolist() == [*range(9), *range(12), *range(7)]
    assert row.segments == Segments((9, 12, 7)) and row.segments.bounds() == [(0, 9), (9, 21), (21, 28)]


@pytest.mark.parametrize(("mode", "checkpointing", "policy"), [("dora", False, "layer"), ("dora", True, "layer"),
                                                               ("dora", True, "mlp"), ("full", True, "layer")])
def test_packed_run_equals_unpacked_run(demo_dir, tmp_path, mode, checkpointing, policy):
    """Several steps with accumulation and per-band loss weights: losses and final weights within 1e-5."""
    outputs = {}
    for packing in (False, True):
        model, dataset, tok = build(str(demo_dir), dropout=0.0, mode=mode)
        config = quick_config(tmp_path / str(packing), batch_size=3, grad_accum=2, max_steps=4, mode=mode,
                              gradient_checkpointing=checkpointing, checkpoint_policy=policy, packing=packing,
                              pack_tokens=500, loss_denominator="weights")
        Trainer(model, dataset, config, pad_id=tok.pad_id).train()
        outputs[packing] = losses(tmp_path / str(packing)), final_tensors(tmp_path / str(packing), mode)
    assert outputs[True][0] == pytest.approx(outputs[False][0], rel=1e-5)
    for name, tensor in outputs[False][1].items():
        assert torch.allclose(outputs[True][1][name], tensor, rtol=1e-5, atol=1e-5 * tensor.abs().max()), name


def test_packed_step_uses_fewer_forwards_and_bf16_stays_close(demo_dir, tmp_path):
    model, dataset, tok = build(str(demo_dir), dropout=0.0)
    items = [dataset[i] for i in range(8)]
    assert len(pack_step(items, 4 * 256)) == 2  # 8 examples of ~200 tokens: 2 rows instead of 8 padded rows
    results = {}
    for packing in (False, True):
        model, dataset, tok = build(str(demo_dir), dropout=0.0, mode="full")
        model.to(torch.bfloat16)
        sl.apply_dora(model, rank=4, alpha=8)
        config = quick_config(tmp_path / str(packing), dtype="bfloat16", packing=packing, max_steps=3)
        Trainer(model, dataset, config, pad_id=tok.pad_id).train()
        results[packing] = losses(tmp_path / str(packing))
    assert results[True] == pytest.approx(results[False], rel=2e-2)  # bf16 rounding, another summation order


def test_packing_resumes_bitwise_after_sigkill(demo_dir, tmp_path):
    subprocess.run(child(demo_dir, tmp_path / "straight", "--pack-tokens", "450"), check=True)
    out = tmp_path / "interrupted"
    process = subprocess.Popen(child(demo_dir, out, "--pack-tokens", "450", slow=True))
    deadline = time.time() + 120
    while not (out / "checkpoint-000004").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoints(out)[-1].name == "checkpoint-000004" and not (out / "adapter").exists()
    subprocess.run(child(demo_dir, out, "--pack-tokens", "450"), check=True)
    straight, resumed = final_tensors(tmp_path / "straight", "dora"), final_tensors(out, "dora")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert losses(out) == losses(tmp_path / "straight")


def test_two_ranks_with_uneven_rows_finish_and_equal_one_process(demo_dir, tmp_path):
    dataset = build(str(demo_dir), dropout=0.0)[1]
    config = quick_config(tmp_path, batch_size=2, grad_accum=2)
    rows_per_rank = []
    for rank in (0, 1):  # the draws each rank makes in the run below, laid out as it lays them out
        draw = iter(sampler_for(dataset, config, rank, 2))
        rows_per_rank.append([len(first_fit_decreasing([len(dataset[next(draw)]["input_ids"]) for _ in range(4)],
                                                        420)) for _ in range(8)])
    assert rows_per_rank[0] != rows_per_rank[1], "the data no longer packs unevenly across ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), *child(demo_dir, tmp_path / "fsdp", "--batch-size", "2", "--dropout", "0",
                                        "--strategy", "fsdp", "--pack-tokens", "420")[1:]]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    subprocess.run(child(demo_dir, tmp_path / "one", "--batch-size", "4", "--dropout", "0", "--pack-tokens", "420"),
                   check=True)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one, two = final_tensors(tmp_path / "one", "dora"), final_tensors(tmp_path / "fsdp", "dora")
    assert all(torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-4 * one[k].abs().max()) for k in one)


def test_bad_packing_settings_are_named(demo_dir, tmp_path):
    for value in (0, -5):
        with pytest.raises(ConfigError, match=rf"setting 'pack_tokens' = {value}: expected an integer, >= 1"):
            sl.TrainConfig(packing=True, pack_tokens=value)
    model, dataset, tok = build(str(demo_dir), dropout=0.0)
    longest = max(dataset.lengths)
    with pytest.raises(ConfigError, match=rf"setting 'pack_tokens' = 100: the longest example has {longest} tokens"):
        Trainer(model, dataset, quick_config(tmp_path, packing=True, pack_tokens=100), pad_id=tok.pad_id)
    with pytest.raises(ConfigError, match=r"'pack_tokens' = 200 \(batch_size x max_len\): the longest example"):
        Trainer(model, dataset, quick_config(tmp_path, packing=True, batch_size=1, max_len=200), pad_id=tok.pad_id)
    bare = [dataset[i] for i in range(4)]  # a plain list: no lengths
    with pytest.raises(ConfigError, match=r"packing = true needs each example's token count: give the dataset a "
                                          r"`lengths` attribute"):
        Trainer(model, bare, quick_config(tmp_path, packing=True, band_sampling=False), pad_id=tok.pad_id)


def test_packing_metrics_count_real_tokens(demo_dir, tmp_path):
    model, dataset, tok = build(str(demo_dir), dropout=0.0)
    Trainer(model, dataset, quick_config(tmp_path, packing=True, max_steps=2), pad_id=tok.pad_id).train()
    tokens = [json.loads(line)["tokens"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    draw = iter(sampler_for(dataset, quick_config(tmp_path), 0, 1))
    assert tokens == [sum(len(dataset[next(draw)]["input_ids"]) for _ in range(4)) for _ in range(2)]


def test_plan_knows_packing(demo_dir):
    from stratos_lite.planning.report import DataShape

    model, dataset, _ = build(str(demo_dir), dropout=0.0)
    data = DataShape.of(dataset)
    config = sl.TrainConfig(batch_size=2, grad_accum=8, max_len=256, dtype="float32", rank=4, alpha=8,
                            packing=True, pack_tokens=600)
    packed = sl.plan(config, model_config=model.config, data=data, memory="1GB")
    assert (packed.seq, packed.forward_shape) == (600, "1 x 600 (a packed row)")
    assert packed.max_row_tokens > 600 and packed.tokens_per_step == sl.plan(
        sl.TrainConfig(**{**config.to_dict(), "packing": False}), model_config=model.config, data=data,
        memory="1GB").tokens_per_step
    estimate = packed.packing.estimate
    assert estimate.micro_batches_per_step == 8 and 5 <= estimate.rows_per_step < 8  # ~207 tokens: 2-3 a row
    assert "rows of up to 600 tokens per step instead of 8 micro-batches" in packed.to_text()
    # A row the memory does not hold is named with the one that fits; one shorter than an example is refused.
    tight = sl.plan(config, model_config=model.config, data=data, memory=packed.peak - 1)
    assert not tight.fits and f"pack_tokens = {tight.max_row_tokens}" in tight.advice()
    with pytest.raises(ConfigError, match=rf"'pack_tokens' = 200: the longest example has {data.longest} tokens"):
        sl.plan(sl.TrainConfig(**{**config.to_dict(), "pack_tokens": 200}), model_config=model.config, data=data)
