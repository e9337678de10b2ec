"""Qwen3 forward, KV cache, generation and checkpoints against transformers (the oracle)."""

import json

import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint

import stratos_lite as sl
from stratos_lite.model.attention import attend, attend_one_token

CONFIGS = {
    "tied-mha-single": (tiny_config(tie_word_embeddings=True, num_key_value_heads=4), "2GB"),
    "untied-gqa2-headdim-sharded": (tiny_config(head_dim=24), "60KB"),
    "untied-gqa4-sharded": (tiny_config(num_attention_heads=8, num_key_value_heads=2, head_dim=8), "60KB"),
    "tied-gqa4-headdim-yarn": (
        tiny_config(tie_word_embeddings=True, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                    rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 128}),
        "2GB",
    ),
}


def tokens(batch=2, length=40, vocab=512, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_fp32(tmp_path, name):
    config, shard = CONFIGS[name]
    reference = write_hf_checkpoint(tmp_path, config, shard_size=shard)
    if shard != "2GB":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = sl.load_model(tmp_path, dtype=torch.float32)
    ids = tokens(length=200 if "yarn" in name else 40)
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() < 1e-4


def test_logits_match_transformers_bf16(tmp_path):
    config = tiny_config(head_dim=24)
    reference = write_hf_checkpoint(tmp_path, config, dtype=torch.bfloat16).to(torch.bfloat16)
    ours = sl.load_model(tmp_path, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = tokens()
    with torch.no_grad():
        expected, got = reference(ids).logits.float(), ours(ids).float()
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 0.03 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize(("source", "target"), [(torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                                                (torch.bfloat16, torch.float16)])
def test_sources_are_cast_to_the_requested_dtype(tmp_path, source, target):
    reference = write_hf_checkpoint(tmp_path, tiny_config(), dtype=source).to(source)
    ours = sl.load_model(tmp_path, dtype=target)
    for name, p in reference.named_parameters():
        assert torch.equal(ours.get_parameter(name), p.detach().to(target)), name


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config(num_key_value_heads=1))
    model = sl.load_model(tmp_path, dtype=torch.float32)
    ids = tokens(length=24)
    with torch.no_grad():
        full = model(ids)
        caches = model.new_kv_caches(batch=2, max_len=24)
        pieces = [model(ids[:, :10], kv_caches=caches)]
        pieces += [model(ids[:, i:i + 1], kv_caches=caches) for i in range(10, 20)]
        pieces.append(model(ids[:, 20:], kv_caches=caches))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-5


def test_logits_at_projects_only_selected_positions(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config())
    model = sl.load_model(tmp_path, dtype=torch.float32)
    ids = tokens(length=12)
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[0, 3], select[1, 7:10] = True, True
    with torch.no_grad():
        at = select.flatten().nonzero()[:, 0]
        assert torch.allclose(model(ids, logits_at=at), model(ids)[select], atol=1e-6)


@pytest.mark.parametrize("prompts", [[[5, 17, 99, 3], [41, 7, 8, 9], [300, 301, 302, 12]],  # one length
                                     [[5, 17, 99, 3, 250, 8], [41, 7], [300, 301, 302, 12]]])  # padded
@pytest.mark.parametrize("cuda_graph", [False, True])  # in-order steps, or fixed-shape steps (eager on a CPU)
def test_greedy_generation_matches_transformers_with_and_without_padding(tmp_path, prompts, cuda_graph):
    config = tiny_config(num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    reference = write_hf_checkpoint(tmp_path, config)
    model = sl.load_model(tmp_path, dtype=torch.float32)
    got = sl.generate(model, prompts, max_new_tokens=12, stop_ids=[2], pad_id=0, cuda_graph=cuda_graph)

    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=2)
    for row, ours in zip(out[:, longest:].tolist(), got, strict=True):
        expected = row[: row.index(2)] if 2 in row else row
        assert ours == expected


def test_generation_masks_only_where_prompts_are_padded(tmp_path, monkeypatch):
    """Prompts of one length: causal prefill and unmasked decoding steps, so no attention kernel is ruled out
    by a mask; padded prompts: masks. Decoding never repeats the key/value cache for the query heads."""
    write_hf_checkpoint(tmp_path, tiny_config(num_attention_heads=4, num_key_value_heads=2, head_dim=24))
    model = sl.load_model(tmp_path, dtype=torch.float32)
    real, calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, is_causal=False, **options):
        calls.append((q.shape[2], k.shape[1], attn_mask is not None, is_causal, options.get("enable_gqa", False)))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **options)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    sl.generate(model, [[5, 6, 7], [8, 9, 10]], max_new_tokens=4)
    prefill, decode = [c for c in calls if c[0] == 3], [c for c in calls if c[0] != 3]
    assert prefill and all(not masked and causal for _, _, masked, causal, _ in prefill)
    assert decode and all(not masked and not causal and heads == 2 and not gqa for _, heads, masked, causal, gqa
                          in decode)  # the two kv heads' queries folded (2 rows each), no repeat, no mask
    calls.clear()
    sl.generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=4)
    assert calls and all(masked for _, _, masked, _, _ in calls)


def test_checking_for_the_end_every_few_tokens_gives_the_same_output(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config())
    model = sl.load_model(tmp_path, dtype=torch.float32)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    free = sl.generate(model, prompts, max_new_tokens=20)
    stops = [free[0][2], free[1][4]]  # rows stop at different steps, one perhaps never
    every_step = sl.generate(model, prompts, max_new_tokens=20, stop_ids=stops, stop_check_every=1)
    assert every_step == sl.generate(model, prompts, max_new_tokens=20, stop_ids=stops, stop_check_every=8)
    assert len(every_step[0]) < 20


def test_one_token_attention_equals_attention_over_repeated_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    mask = torch.rand(3, 1, 1, 11) > 0.3
    mask[..., -1] = True
    repeated = [t.repeat_interleave(4, dim=1) for t in (k, v)]
    for m in (None, mask):
        expected = torch.nn.functional.scaled_dot_product_attention(q, *repeated, attn_mask=m)
        assert torch.allclose(attend_one_token(q, k, v, m), expected, atol=1e-6)


def test_masked_grouped_attention_folds_query_heads_instead_of_repeating_keys():
    """A padded prefill's attention (a boolean mask, 4 query heads per key/value head) gives what attention over
    repeated keys gives, without repeating them and without asking any kernel for GQA support."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 9, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    padded = torch.ones(3, 1, 9, 9, dtype=torch.bool).tril()
    padded[1:, ..., :3] = False
    padded[..., torch.arange(9), torch.arange(9)] = True
    repeated = [t.repeat_interleave(4, dim=1) for t in (k, v)]
    for mask in (padded, padded[0, 0]):  # per row, and one (t, keys) mask for every row
        expected = torch.nn.functional.scaled_dot_product_attention(q, *repeated, attn_mask=mask)
        assert torch.allclose(attend(q, k, v, mask, gqa=True), expected, atol=1e-6)


def test_generation_stops_at_stop_token_and_samples_reproducibly(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config())
    model = sl.load_model(tmp_path, dtype=torch.float32)
    prompt = [[5, 6, 7]]
    free = sl.generate(model, prompt, max_new_tokens=8)[0]
    assert len(free) == 8
    stopped = sl.generate(model, prompt, max_new_tokens=8, stop_ids=[free[3]])[0]
    assert stopped == free[: free.index(free[3])]
    runs = [sl.generate(model, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9,
                        generator=torch.Generator().manual_seed(3))[0] for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("shard", ["2GB", "40KB"])
def test_save_pretrained_loads_in_transformers(tmp_path, tokenizer, shard):
    import transformers

    write_hf_checkpoint(tmp_path / "src", tiny_config(tie_word_embeddings=shard == "2GB"))
    model = sl.load_model(tmp_path / "src", dtype=torch.float32)
    sl.save_pretrained(model, tokenizer, tmp_path / "out", max_shard_size=shard)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = tokens()
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids)).abs().max().item() < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "<|im_start|>user\nKuwait oil<|im_end|>\n"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    again, tok = sl.load_pretrained(tmp_path / "out", dtype=torch.float32)
    assert tok.encode(text) == tokenizer.encode(text)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_loaded_weights_are_private_to_each_model(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config(), dtype=torch.bfloat16)
    a = sl.load_model(tmp_path, dtype=torch.bfloat16)
    b = sl.load_model(tmp_path, dtype=torch.bfloat16)
    w_a, w_b = a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w_a, w_b)
    # Even when both point into the same file, writing to one leaves the file and the other untouched.
    with torch.no_grad():
        w_a.add_(1)
    assert not torch.equal(w_a, w_b)


# Bad input: one clear error that names the file or tensor.

def test_missing_config(tmp_path):
    with pytest.raises(sl.ModelFileError, match=r"config\.json"):
        sl.load_model(tmp_path)


def test_not_qwen3(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config())
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(sl.ModelFileError, match="LlamaForCausalLM"):
        sl.load_model(tmp_path)


def test_missing_shard(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config(), shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(sl.ModelFileError, match=shard.name):
        sl.load_model(tmp_path)


def _rewrite(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config())
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(sl.ModelFileError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        sl.load_model(tmp_path)


def test_unexpected_tensor(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config())
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(sl.ModelFileError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        sl.load_model(tmp_path)


def test_shape_mismatch(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config())
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = r"down_proj\.weight' has shape \(64, 96\), config\.json implies \(64, 128\)"
    with pytest.raises(sl.ModelFileError, match=message):
        sl.load_model(tmp_path)


def test_config_reads_new_and_old_rope_keys():
    old = tiny_config(rope_theta=5e5, rope_scaling={"type": "yarn", "factor": 2.0})
    new = {k: v for k, v in tiny_config().items() if k != "rope_theta"}
    new["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 2.0}
    a, b = sl.Qwen3Config.from_dict(old), sl.Qwen3Config.from_dict(new)
    assert a.rope_theta == b.rope_theta == 5e5
    assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == 2.0
    with pytest.raises(sl.ModelFileError, match="rope scaling 'dynamic'"):
        sl.Qwen3Config.from_dict(tiny_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))



@pytest.mark.parametrize("policy", ["layer", "mlp"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, policy):
    write_hf_checkpoint(tmp_path, tiny_config())
    model = sl.load_model(tmp_path, dtype=torch.float32)
    ids = tokens(length=20)

    def gradients():
        model.zero_grad(set_to_none=True)
        model(ids).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.set_gradient_checkpointing(True, policy=policy)
    assert all(layer.checkpointing == policy for layer in model.model.layers)
    for a, b in zip(plain, gradients(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="policy must be"):
        model.set_gradient_checkpointing(True, policy="attention")


def test_tied_checkpoint_carrying_lm_head_loads(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_config(tie_word_embeddings=True))
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": torch.full((512, 64), float("nan"))}))
    model = sl.load_model(tmp_path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the stale copy is ignored, not loaded
    assert torch.isfinite(model.lm_head.weight).all()
