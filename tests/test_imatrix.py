"""The importance matrix from the task's prompts: its sums against llama.cpp's own llama-imatrix, its file in
both directions, and what it refuses."""

import llama_oracle
import numpy as np
import pytest
import torch
from conftest import CORPUS, tiny_config, write_hf_checkpoint
from isolation import call_in_child

import stratos_lite as sl
from stratos_lite.export.gguf_file import export_gguf
from stratos_lite.export.imatrix import calibration_sequences, collect_imatrix, compute_imatrix, text_chunks
from stratos_lite.export.imatrix_file import ImatrixError, ImportanceMatrix

CHUNK = 32


def tiny_model(tmp_path, **overrides):
    write_hf_checkpoint(tmp_path / "hf", tiny_config(**overrides), seed=3)
    return sl.load_model(tmp_path / "hf", dtype=torch.float32)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sums_and_counts_equal_llama_imatrix(tmp_path, tokenizer, tied):
    """The same model (its f32 GGUF for llama.cpp) over the same text in the same chunks: every entry's token
    count is llama-imatrix's and its sums agree to float rounding (the products are computed by different
    code). The output projection is collected when asked, and not at all with tied embeddings, as there."""
    model = tiny_model(tmp_path, tie_word_embeddings=tied)
    f32 = export_gguf(model, tokenizer, tmp_path / "f32.gguf", quant="f32", modelfile=False)
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(CORPUS * 4))
    theirs = tmp_path / "theirs.imatrix.gguf"
    llama_oracle.imatrix(f32, text, theirs, CHUNK, process_output=True)
    reference = ImportanceMatrix.load(theirs)
    ids = call_in_child(llama_oracle.tokenize, f32, [text.read_text()], False)[0]
    ours = collect_imatrix(model, text_chunks(ids, CHUNK), batch_size=3, include_output=True)
    assert set(ours.sums) == set(reference.sums)
    assert ("output.weight" in ours.sums) == (not tied)
    assert len(ours.sums) == 7 * 2 + (not tied)
    for name, sums in reference.sums.items():
        assert ours.counts[name] == reference.counts[name] == len(ids) // CHUNK * CHUNK, name
        np.testing.assert_allclose(ours.sums[name].numpy(), sums.numpy(), rtol=2e-4, atol=1e-6, err_msg=name)
    assert reference.chunk_size == CHUNK and reference.datasets == [str(text)]


def test_file_round_trip_and_llama_format(tmp_path, tokenizer):
    model = tiny_model(tmp_path)
    sequences = [tokenizer.encode(line) for line in CORPUS]
    matrix = collect_imatrix(model, sequences, datasets=["corpus"])
    path = matrix.save(tmp_path / "m.imatrix.gguf")
    back = ImportanceMatrix.load(path)
    assert back.counts == matrix.counts and back.datasets == ["corpus"]
    assert back.chunk_count == len(CORPUS) and back.chunk_size == max(map(len, sequences))
    for name in matrix.sums:
        assert torch.equal(back.sums[name], matrix.sums[name].float())
        assert torch.equal(back.importance(name), matrix.importance(name))
    import gguf

    reader = gguf.GGUFReader(path)
    assert "general.architecture" not in reader.fields  # as llama-imatrix writes it
    shapes = {t.name: tuple(t.shape) for t in reader.tensors}
    assert shapes["blk.0.ffn_down.weight.in_sum2"] == (96, 1) and shapes["blk.0.ffn_down.weight.counts"] == (1, 1)


def test_padding_does_not_count(tmp_path, tokenizer):
    """Sequences of different lengths in one batch give the same matrix as each alone."""
    model = tiny_model(tmp_path)
    sequences = [tokenizer.encode(line) for line in CORPUS[:4]]
    together = collect_imatrix(model, sequences, batch_size=4)
    alone = collect_imatrix(model, sequences, batch_size=1)
    assert together.counts == alone.counts == dict.fromkeys(alone.counts, sum(map(len, sequences)))
    for name in alone.sums:
        torch.testing.assert_close(together.sums[name], alone.sums[name], rtol=1e-5, atol=1e-9)


def test_task_records_count_the_positions_that_predict_the_completion(tmp_path, demo_dir):
    """Records rendered as training renders them; by default only the positions whose next token is part of
    the completion are summed (each equal to the matrix of that slice of positions alone), with "all" every one."""
    tokenizer = sl.Tokenizer.from_pretrained(demo_dir / "tokenizer")
    model = tiny_model(tmp_path, vocab_size=tokenizer.vocab_size)
    data = demo_dir / "eval.jsonl"
    dataset = sl.ScoredDataset.from_jsonl(data, tokenizer, 1024)
    sequences, counted = calibration_sequences(tokenizer, [data], max_len=1024)
    assert sequences == [example.input_ids.tolist() for example in dataset.examples]
    prompt_lengths = [int((e.labels == -100).sum()) for e in dataset.examples]
    assert counted == [(p - 1, len(s) - 1) for p, s in zip(prompt_lengths, sequences, strict=True)]
    matrix = compute_imatrix(model, tokenizer, [data], max_len=1024, batch_size=16)
    assert matrix.datasets == [str(data)]
    assert matrix.counts["blk.1.attn_q.weight"] == sum(end - start for start, end in counted)
    # The first sequence alone: its counted positions' squared inputs, from a forward pass of the whole of it.
    first = collect_imatrix(model, sequences[:1], counted=counted[:1])
    inputs = {}
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    with torch.no_grad():
        model(torch.tensor(sequences[:1]))
    handle.remove()
    start, end = counted[0]
    expected = inputs["x"][0, start:end].double().square().sum(0)
    torch.testing.assert_close(first.sums["blk.1.ffn_down.weight"], expected, rtol=1e-5, atol=1e-9)
    everything = compute_imatrix(model, tokenizer, [data], max_len=1024, positions="all", batch_size=16)
    assert everything.counts["blk.1.attn_q.weight"] == sum(dataset.lengths)
    assert compute_imatrix(model, tokenizer, [data], limit=3).chunk_count == 3


def test_bad_inputs_name_the_file_and_what_is_wrong(tmp_path, tokenizer):
    model = tiny_model(tmp_path)
    not_imatrix = export_gguf(model, tokenizer, tmp_path / "model.gguf", quant="f32", modelfile=False)
    with pytest.raises(ImatrixError, match=r"model\.gguf: not an importance matrix"):
        ImportanceMatrix.load(not_imatrix)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ImatrixError, match=r"junk\.gguf: not a readable GGUF"):
        ImportanceMatrix.load(tmp_path / "junk.gguf")
    other = tiny_model(tmp_path / "other", hidden_size=32, head_dim=8)
    matrix = collect_imatrix(other, [tokenizer.encode(CORPUS[0])])
    with pytest.raises(ImatrixError, match=r"blk\.0\.attn_q\.weight has 32 input channels, the model's tensor 64") \
            as caught:
        export_gguf(model, tokenizer, tmp_path / "q.gguf", quant="q4_k_m", imatrix=matrix)
    assert isinstance(caught.value, sl.ExportError)  # what a caller of export_gguf catches
    assert not (tmp_path / "q.gguf").exists()
    with pytest.raises(ImatrixError, match="fewer than one chunk of 512"):
        text_chunks(list(range(100)), 512)
    with pytest.raises(ImatrixError, match="no calibration sequences"):
        collect_imatrix(model, [])
    with pytest.raises(ImatrixError, match="positions must be one of completion, all, got 'prompt'"):
        calibration_sequences(tokenizer, [], positions="prompt")


def test_commands_compute_the_matrix_and_export_with_and_without_it(tmp_path, demo_dir):
    """`imatrix` writes the task's matrix; `export --imatrix-data --also-without` computes it beside the files
    and writes each K-quant twice, the matrix's files saying so in their metadata as llama-quantize's do."""
    import gguf

    from stratos_lite.commands import main

    tokenizer = sl.Tokenizer.from_pretrained(demo_dir / "tokenizer")
    write_hf_checkpoint(tmp_path / "model", tiny_config(vocab_size=tokenizer.vocab_size, hidden_size=256,
                                                        intermediate_size=256, head_dim=64), seed=5)
    tokenizer.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--dtype", "float32", "--device", "cpu"]
    main(["imatrix", *common, "--data", str(demo_dir / "eval.jsonl"), "--out", str(tmp_path / "task.imatrix.gguf")])
    assert ImportanceMatrix.load(tmp_path / "task.imatrix.gguf").datasets == [str(demo_dir / "eval.jsonl")]
    main(["export", *common, "--out", str(tmp_path / "out" / "s.gguf"), "--quant", "q8_0,q3_k_m",
          "--imatrix-data", str(demo_dir / "eval.jsonl"), "--also-without"])
    written = sorted(path.name for path in (tmp_path / "out").glob("*.gguf"))
    assert written == ["s-q3_k_m-imatrix.gguf", "s-q3_k_m.gguf", "s-q8_0.gguf", "s.imatrix.gguf"]

    def imatrix_keys(name):
        return {k for k in gguf.GGUFReader(tmp_path / "out" / name).fields if k.startswith("quantize.imatrix")}

    assert imatrix_keys("s-q3_k_m-imatrix.gguf") == {"quantize.imatrix.file", "quantize.imatrix.dataset",
                                                     "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"}
    assert imatrix_keys("s-q3_k_m.gguf") == imatrix_keys("s-q8_0.gguf") == set()
    with pytest.raises(SystemExit):
        main(["export", *common, "--out", str(tmp_path / "x.gguf"), "--also-without"])
