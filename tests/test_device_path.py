"""The device path, where the CPU can check it: DoRA's magnitude reaches a bf16 forward, the process-group
backend follows the model's device, bf16 support is asked of the model's device, plan sizes in GiB."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import stratos_lite as sl
from stratos_lite.data.batch import Batch, LossPositions
from stratos_lite.model.dora import dora_layers
from stratos_lite.model.folders import parse_size
from stratos_lite.train.device import bf16_is_native
from stratos_lite.train.strategy import process_group_backend


def without_time(line: str) -> dict:
    return {k: v for k, v in json.loads(line).items() if k != "step_seconds"}


def bf16_layer(seed: int = 0) -> sl.DoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    layer = sl.DoRALinear(base, rank=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)  # a trained adapter: m / n is not exactly 1
    return layer


def outputs(layer: sl.DoRALinear, x: torch.Tensor, training: bool) -> torch.Tensor:
    layer.train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
        return layer(x).detach().float()


def test_the_bf16_forward_rescales_as_fp32_does():
    """The training forward's output is the fp32 rescale of W x + s B A x rounded once to bf16. With m / n
    rounded to bf16 first (steps of 2^-8 below 1, 2^-7 above), magnitude changes under ~0.4 % vanished from
    the forward: there 80 % of these outputs matched, here all but rounding ties at bf16's last bit."""
    layer, x = bf16_layer(1), torch.randn(4096, 256).to(torch.bfloat16)
    layer.dropout = 0.0
    with torch.no_grad():
        layer.lora_magnitude.mul_(1 + 1e-3 * torch.randn(64))  # small changes, as lr 1e-5 makes them
        target, norm = layer.lora_magnitude.clone(), layer.weight_norm().clone()
        layer.lora_magnitude.copy_(norm)  # m = n: the output is W x + s B A x itself
    combined = outputs(layer, x, training=True)
    with torch.no_grad():
        layer.lora_magnitude.copy_(target)
    rescaled = outputs(layer, x, training=True)
    ideal = (combined.double() * (target.double() / norm.double())).to(torch.bfloat16).float()
    assert (rescaled == ideal).float().mean() > 0.99


def test_unmerged_bf16_outputs_follow_the_merged_model_after_small_changes():
    """The folded inference path against the merged weight (computed in fp32): per output row, the offset
    between the two is bf16 rounding (mean 0.09 %), where with m / n rounded to bf16 it was twice that."""
    layer, x = bf16_layer(1), torch.randn(4096, 256).to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_magnitude.mul_(1 + 1e-3 * torch.randn(64))
    unmerged = outputs(layer, x, training=False)
    merged = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        merged.weight.copy_(layer.merged_weight())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        reference = merged(x).float()
    offset = ((unmerged - reference) * reference).sum(0) / (reference * reference).sum(0)  # per row
    assert offset.abs().mean() < 1.2e-3 and offset.abs().max() < 2.8e-3  # 1.6e-3 and 3.8e-3 before


def test_process_group_backend_follows_the_models_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host
    assert process_group_backend(torch.device("cpu")) == "gloo"  # a CPU model keeps gloo there too
    assert process_group_backend(torch.device("cuda", 1)) == "nccl"  # NCCL, or RCCL on ROCm


def test_bf16_support_is_asked_of_the_device_and_sizes_say_their_units(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: calls.append(
        including_emulation) or False)
    assert not bf16_is_native(torch.device("cuda", 0)) and calls == [False]  # emulation does not count
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("24GB") == 24 * 10**9
    assert parse_size("512MiB") == 512 * 2**20 and parse_size(1000) == 1000


def test_deterministic_setting_turns_on_deterministic_algorithms_for_the_run(demo_dir, tmp_path, monkeypatch):
    from test_trainer import quick_config
    from train_child import build

    from stratos_lite.train.loss import example_losses
    from stratos_lite.train.trainer import Trainer

    seen = []
    real = example_losses

    def watching(model, batch, loss_chunk=0):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(model, batch, loss_chunk)

    monkeypatch.setattr("stratos_lite.train.trainer.example_losses", watching)
    runs = []
    for name in ("a", "b"):
        model, dataset, tok = build(str(demo_dir), dropout=0.1)
        config = quick_config(tmp_path / name, deterministic=True, max_steps=3)
        Trainer(model, dataset, config, pad_id=tok.pad_id).train()
        runs.append((tmp_path / name / "metrics.jsonl").read_text().splitlines())
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()  # on for the run, off after
    assert [without_time(line) for line in runs[0]] == [without_time(line) for line in runs[1]]
    # The atomic-free per-example sums equal the default ones.
    model, dataset, tok = build(str(demo_dir), dropout=0.0)
    batch = sl.collate([dataset[i] for i in range(4)], tok.pad_id)
    with torch.no_grad():
        default = real(model, batch)
        torch.use_deterministic_algorithms(True)
        try:
            exact = real(model, batch)
        finally:
            torch.use_deterministic_algorithms(False)
    assert torch.allclose(default, exact, rtol=1e-6)


def test_gguf_engine_offloads_every_layer_when_llama_cpp_has_a_gpu(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from stratos_lite.evaluation import engines

    calls = []
    for gpu_build, expected in ((True, -1), (False, 0)):
        fake = SimpleNamespace(llama_supports_gpu_offload=lambda gpu=gpu_build: gpu,
                               Llama=lambda **options: calls.append(options))
        monkeypatch.setattr(engines, "import_llama_cpp", lambda fake=fake: fake)
        (tmp_path / "m.gguf").write_bytes(b"GGUF")
        engines.LlamaCppEngine(tmp_path / "m.gguf")
        assert calls[-1]["n_gpu_layers"] == expected
    engines.LlamaCppEngine(tmp_path / "m.gguf", n_gpu_layers=12)
    assert calls[-1]["n_gpu_layers"] == 12


def test_install_script_keeps_a_gpu_build_of_llama_cpp(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("def llama_supports_gpu_offload():\n    return True\n")
    script = Path(__file__).parent.parent / "scripts" / "install_llama_cpp.sh"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "GPU offload is installed: keeping it" in done.stdout


def test_the_attention_kernel_a_call_gets_is_read_from_the_call():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stratos_lite.model.attention_report import attention_line, kernel_of_call, training_kernel

    assert training_kernel(4, 2, 16, torch.device("cpu"), torch.float32) == "flash"  # the CPU's flash kernel
    q, k, v = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    with sdpa_kernel([SDPBackend.MATH]):
        assert kernel_of_call(q, k, v, None, backward=True) == "math"
    config = sl.Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert attention_line(config, torch.device("cpu"), torch.float32).startswith(
        "attention: SDPA runs the training call on the flash kernel, torch ")
    assert "attention_kernel = 'math'" in attention_line(config, torch.device("cpu"), torch.float32, "math")


@pytest.mark.parametrize("packing", [False, True])
def test_a_training_step_never_waits_for_the_device_until_its_end(demo_dir, tmp_path, packing, monkeypatch):
    """What would make the host wait for a GPU mid-step (a device tensor read as a Python number, nonzero,
    a boolean mask used as an index) happens to no tensor on the device in a step's forwards, backwards,
    clipping and update: the loss positions come with the batch from the CPU, and the step reads its loss
    and norm once, at its end (one .tolist(), which torch does not dispatch as an op, so it is not seen here).
    On a CPU "on the device" is followed by hand: the parameters, the batch as the step moves it, and
    everything computed from them."""
    from test_trainer import quick_config
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from train_child import build

    from stratos_lite.train.trainer import Trainer

    class DeviceWaits(TorchDispatchMode):
        def __init__(self, on_device):
            super().__init__()
            self.on_device, self.seen = {id(t): t for t in on_device}, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
            name = func.overloadpacket.__name__
            masked_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
            if any(id(t) in self.on_device for t in inputs) and (masked_index or name in (
                    "nonzero", "_local_scalar_dense", "is_nonzero", "item")):
                self.seen.append(name)
            result = func(*args, **(kwargs or {}))
            if any(id(t) in self.on_device for t in inputs):
                self.on_device.update({id(t): t for t in tree_leaves(result) if isinstance(t, torch.Tensor)})
            return result

    model, dataset, tok = build(str(demo_dir), dropout=0.1)
    config = quick_config(tmp_path, max_steps=1, packing=packing, grad_accum=2)
    trainer = Trainer(model, dataset, config, pad_id=tok.pad_id)
    moved = []

    def to_device(batch, device, pinned=False):  # fresh tensors, as a copy to a GPU makes
        copies = {name: getattr(batch, name).clone() for name in ("input_ids", "labels", "weight", "position_ids",
                                                                  "example_of") if getattr(batch, name) is not None}
        loss = LossPositions(*(t.clone() for t in dataclasses.astuple(batch.loss)))
        moved.extend([*copies.values(), *dataclasses.astuple(loss)])
        waits.on_device.update({id(t): t for t in moved})
        return dataclasses.replace(batch, **copies, loss=loss)

    monkeypatch.setattr(Batch, "to", to_device)
    micro_batches = trainer.lay_out([dataset[i] for i in range(config.batch_size * config.grad_accum)])
    optimizer = torch.optim.AdamW(trainer.params, lr=1e-3)
    with DeviceWaits(list(model.parameters())) as waits:
        loss, grad_norm, _ = trainer.step(micro_batches, optimizer)
    assert moved and len(waits.on_device) > 100  # the following reached the step's work
    assert waits.seen == [] and math.isfinite(loss) and grad_norm > 0


def test_fixed_shape_decoding_steps_repeat_the_same_kernels_and_never_read_the_device(tmp_path, monkeypatch):
    """What a CUDA graph needs of a decoding step, checked on the CPU: every step dispatches the same ops on
    tensors of the same shapes (a graph replays one recording), and none reads a value back to the host.
    The in-order steps fail the first (the keys grow by one per step); the fixed-shape ones pass both, here
    with unmerged DoRA adapters and a padded batch, and give the in-order steps' tokens."""
    from conftest import tiny_config, write_hf_checkpoint
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from stratos_lite.model.generate import GraphedSteps, InOrderSteps

    class StepOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = tuple(tuple(t.shape) for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor))
            self.ops.append((func.overloadpacket.__name__, shapes))
            return func(*args, **(kwargs or {}))

    def recorded(kind):
        steps, real = [], kind.__call__

        def recording(self, token):
            with StepOps() as mode:
                logits = real(self, token)
            steps.append(mode.ops)
            return logits

        monkeypatch.setattr(kind, "__call__", recording)
        return steps

    write_hf_checkpoint(tmp_path, tiny_config(num_attention_heads=4, num_key_value_heads=2, head_dim=24))
    model = sl.load_model(tmp_path, dtype=torch.float32)
    sl.apply_dora(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_B.normal_(0, 0.05)
    model.eval()
    prompts = [[5, 6, 7, 40, 41], [8, 9], [10, 11, 12]]
    fixed, in_order = recorded(GraphedSteps), recorded(InOrderSteps)
    graphed = sl.generate(model, prompts, max_new_tokens=10, cuda_graph=True)
    assert graphed == sl.generate(model, prompts, max_new_tokens=10)
    assert len(fixed) == 9 and all(ops == fixed[0] for ops in fixed)
    host_reads = {"_local_scalar_dense", "item", "nonzero", "is_nonzero"}
    assert not host_reads & {name for ops in fixed for name, _ in ops}
    assert len(in_order) == 9 and in_order[1] != in_order[0]


def test_fixed_shape_decoding_reuses_one_graph_per_shape_while_the_weights_stay(tmp_path):
    from conftest import tiny_config, write_hf_checkpoint

    from stratos_lite.model.generate import GraphedSteps

    write_hf_checkpoint(tmp_path, tiny_config())
    model = sl.load_model(tmp_path, dtype=torch.float32)
    sl.apply_dora(model, rank=4, alpha=8, dropout=0.0)
    model.eval()
    first, second = [[5, 6, 7], [8, 9]], [[11, 12], [13, 14, 15]]  # one shape: batch 2, 3 + 6 keys

    def steps():
        return model.decode_graphs[(2, 9, torch.device("cpu"), torch.float32)]

    assert sl.generate(model, first, max_new_tokens=6, cuda_graph=True) == sl.generate(model, first, max_new_tokens=6)
    made = steps()
    assert sl.generate(model, second, max_new_tokens=6, cuda_graph=True) == sl.generate(model, second,
                                                                                       max_new_tokens=6)
    assert steps() is made  # the same buffers (and, on a GPU, the same captured graph) serve the second call
    with torch.no_grad():  # a training step changes weights in place: the steps made for the old ones are not used
        next(p for name, p in model.named_parameters() if "lora_B" in name).add_(0.1)
    assert sl.generate(model, first, max_new_tokens=6, cuda_graph=True) == sl.generate(model, first, max_new_tokens=6)
    assert steps() is not made
    changed = steps()
    with sl.adapters_disabled(model):
        assert sl.generate(model, first, max_new_tokens=6, cuda_graph=True) == sl.generate(model, first,
                                                                                           max_new_tokens=6)
        assert steps() is not changed
    assert isinstance(changed, GraphedSteps)


def test_aotriton_version_is_read_from_the_library_file_name(tmp_path):
    from stratos_lite.model.attention_report import aotriton_version

    assert aotriton_version(tmp_path) == "unknown"
    for name in ("libaotriton_v2.so", "libaotriton_v2.so.0", "libaotriton_v2.so.0.11.1"):
        (tmp_path / name).touch()
    assert aotriton_version(tmp_path) == "0.11.1"


def test_what_deterministic_cannot_promise_on_rocm_is_said(monkeypatch):
    from stratos_lite.train.device import determinism_gap

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert determinism_gap(True, "sdpa", gpu) is None  # CUDA (or this CPU build): the promise holds as written
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert "attention_kernel = 'math'" in determinism_gap(True, "sdpa", gpu)
    assert determinism_gap(True, "math", gpu) is None and determinism_gap(True, "sdpa", cpu) is None
    assert determinism_gap(False, "sdpa", gpu) is None
