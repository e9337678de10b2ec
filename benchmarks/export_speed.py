"""GGUF export of a base model + DoRA adapter: stratos_lite's one pass against the reference route, same run.

    python benchmarks/export_speed.py [--quant q8_0] [--params 534e6] [--folder /tmp/sl_export_bench]

The reference route is PEFT merge_and_unload + save_pretrained, then gguf-py's writer: with gguf.quants
q8_0 for --quant q8_0; for a K-quant (q4_k_m, q5_k_m, q6_k) it writes f16 as llama.cpp's convert script
does and runs llama.cpp's own quantizer (llama_model_quantize, 2 threads) on that file, as `llama-quantize`
would. Each route runs in a fresh interpreter; peak = peak RSS minus the RSS before the export started.
For q8_0, then the quantizer alone against gguf.quants on one 4096 x 4096 matrix.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from load_memory import bench_config, rss_bytes


def write_inputs(folder: Path, params: float) -> None:
    write_base_and_adapter(folder, bench_config(params))


def write_base_and_adapter(folder: Path, config: dict):
    """A random bf16 base of `config` in folder/base and a DoRA r16 adapter with non-zero B in folder/adapter;
    returns the model (adapter attached) and its tokenizer."""
    import stratos_lite as sl
    from stratos_lite.demo.data import PROFILES

    torch.manual_seed(0)
    with torch.device("meta"):
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config.from_dict(config))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.tie_weights()  # to_empty gives a tied head storage of its own
    model.initialize_weights()
    tokenizer = sl.train_chatml_tokenizer([p.text() for p in PROFILES] * 4, vocab_size=1024)
    sl.save_pretrained(model, tokenizer, folder / "base", max_shard_size="400MB")
    sl.apply_dora(model, rank=16, alpha=32, dropout=0.05)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, sl.DoRALinear):
                layer.lora_B.normal_(0, 0.01)
    sl.save_adapter(model, folder / "adapter")
    return model, tokenizer


def ours(folder: Path, out: Path, quant: str) -> dict:
    from stratos_lite.export.gguf_file import export_gguf_from_folder

    start = time.perf_counter()
    export_gguf_from_folder(folder / "base", out, folder / "adapter", quant=quant, modelfile=False)
    return {"seconds": time.perf_counter() - start}


def llama_quantize(source: Path, target: Path, quant: str) -> None:
    import ctypes

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"))
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source}")


def _add_metadata(writer, base: Path) -> None:
    """Hyperparameters and tokenizer for an f16 file (no tensors are touched: the model is on the meta device)."""
    import stratos_lite as sl
    from stratos_lite.export.gguf_file import add_hyperparameters, add_tokenizer

    with torch.device("meta"):
        model = sl.Qwen3ForCausalLM(sl.Qwen3Config.from_dict(json.loads((base / "config.json").read_text())))
    add_hyperparameters(writer, model, "f16", "bench")
    add_tokenizer(writer, sl.Tokenizer.from_pretrained(base), model.config.vocab_size)


def reference(folder: Path, out: Path, quant: str) -> dict:
    import gguf
    import transformers
    from peft import PeftModel
    from safetensors import safe_open

    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, folder / "adapter").merge_and_unload()
    with tempfile.TemporaryDirectory() as merged_dir:
        merged.save_pretrained(merged_dir)
        del merged, model
        middle = time.perf_counter()
        names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
        layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                       "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                       "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                       "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                       "mlp.down_proj": "ffn_down"}
        k_quant = quant != "q8_0"
        converted = out.with_suffix(".f16.gguf") if k_quant else out
        writer = gguf.GGUFWriter(converted, "qwen3")
        if k_quant:  # a file llama.cpp can load: the metadata convert_hf_to_gguf.py would write
            _add_metadata(writer, folder / "base")
        else:
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        for shard in sorted(Path(merged_dir).glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    module = key.removesuffix(".weight")
                    if module.startswith("model.layers."):
                        index, rest = module.removeprefix("model.layers.").split(".", 1)
                        name = f"blk.{index}.{layer_names[rest]}.weight"
                    else:
                        name = names[module] + ".weight"
                    data = f.get_tensor(key).float().numpy()
                    if data.ndim == 2 and k_quant:
                        writer.add_tensor(name, data.astype(np.float16))
                    elif data.ndim == 2:
                        writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                    else:
                        writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if k_quant:
        llama_quantize(converted, out, quant)
        converted.unlink()
    end = time.perf_counter()
    return {"seconds": end - start, "merge_save": middle - start, "quantize_write": end - middle}


def child(route: str, folder: Path, quant: str) -> None:
    before = rss_bytes()
    with tempfile.TemporaryDirectory() as out_dir:
        result = (ours if route == "ours" else reference)(folder, Path(out_dir) / "model.gguf", quant)
        result["bytes"] = (Path(out_dir) / "model.gguf").stat().st_size
    result["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps(result))


def quantizer_rates() -> tuple[float, float]:
    import gguf

    from stratos_lite.export.gguf_file import quantize_q8_0

    x = torch.randn(4096, 4096)
    rates = []
    for run in (lambda: gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0), lambda: quantize_q8_0(x)):
        run()
        best = min(_timed(run) for _ in range(3))
        rates.append(x.numel() / best)
    assert np.array_equal(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0), quantize_q8_0(x))
    return rates[0], rates[1]


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=534e6)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/sl_export_bench"))
    parser.add_argument("--quant", default="q8_0", choices=["q8_0", "q6_k", "q5_k_m", "q4_k_m"])
    parser.add_argument("--child", choices=["ours", "reference"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.folder, args.quant)
    if not (args.folder / "adapter" / "adapter_config.json").is_file():
        write_inputs(args.folder, args.params)
    size = sum(f.stat().st_size for f in (args.folder / "base").glob("*.safetensors"))
    print(f"base: {size / 1e9:.2f} GB bf16; DoRA r16 on all 7 linears; {args.quant} GGUF")
    results = {}
    for route in ("reference", "ours"):
        out = subprocess.run([sys.executable, __file__, "--child", route, "--folder", str(args.folder), "--quant",
                              args.quant], check=True, capture_output=True, text=True).stdout
        results[route] = json.loads(out.strip().splitlines()[-1])
    ref, mine = results["reference"], results["ours"]
    print(f"reference route: {ref['seconds']:.1f} s (merge + save {ref['merge_save']:.1f} s, write + quantize "
          f"{ref['quantize_write']:.1f} s), peak {ref['peak'] / 1e9:.2f} GB, file {ref['bytes'] / 1e9:.2f} GB")
    print(f"stratos_lite:    {mine['seconds']:.1f} s, peak {mine['peak'] / 1e9:.2f} GB, "
          f"file {mine['bytes'] / 1e9:.2f} GB")
    print(f"ratio: {ref['seconds'] / mine['seconds']:.2f}x faster, peak memory {mine['peak'] / ref['peak']:.2f}x")
    if args.quant != "q8_0":
        return
    theirs, ours_rate = quantizer_rates()
    print(f"q8_0 quantizer alone (4096 x 4096 fp32): gguf.quants {theirs / 1e6:.0f} M params/s, "
          f"stratos_lite {ours_rate / 1e6:.0f} M params/s ({ours_rate / theirs:.1f}x), bytes identical")


if __name__ == "__main__":
    main()
