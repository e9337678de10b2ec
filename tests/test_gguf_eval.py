"""The exported GGUF evaluated in llama.cpp beside the torch model, and the prompts servers build from it.
Every llama.cpp call runs in a child process (tests/isolation.py)."""

import json

import llama_oracle
import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint
from isolation import call_in_child

import stratos_lite as sl
from stratos_lite.data.task import SYSTEM_PROMPT, scoring_messages
from stratos_lite.evaluation.serving import ollama_prompt, render_go_template
from stratos_lite.export import gguf_file, modelfile

ROWS = [{"profile_id": f"p{k % 3}", "profile": f"Reader {k % 3}, field {k % 2}", "article_id": f"a{k // 3}",
         "title": f"Story {k // 3}", "article": "Output rose.", "score": float(k), "reasoning": f"Because {k}."}
        for k in range(6)]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, tokenizer):
    """A tiny Qwen3 overfitted on six scored rows (so that it answers in the scorer's format), saved as an HF
    folder and exported as an f32 GGUF with its Modelfile."""
    folder = tmp_path_factory.mktemp("scorer")
    eval_path = folder / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    write_hf_checkpoint(folder / "random", tiny_config(vocab_size=tokenizer.vocab_size, hidden_size=96,
                                                       intermediate_size=192))
    model = sl.load_model(folder / "random", dtype=torch.float32)
    data = sl.ScoredDataset.from_jsonl(eval_path, tokenizer, max_len=256)
    config = sl.TrainConfig(mode="full", lr=1e-2, max_steps=80, batch_size=6, grad_accum=1, dtype="float32",
                            band_sampling=False, verify_batches=0, progress=False, gradient_checkpointing=False,
                            save_every=1000, out_dir=str(folder / "train"))
    sl.Trainer(model, data, config, pad_id=tokenizer.pad_id).train()
    sl.save_pretrained(model.eval(), tokenizer, folder / "model")
    gguf = sl.export_gguf(model, tokenizer, folder / "scorer-f32.gguf", quant="f32", system_prompt=SYSTEM_PROMPT)
    return folder, eval_path, gguf


def test_gguf_evaluation_agrees_with_torch_on_every_example(scorer, tmp_path):
    folder, eval_path, gguf = scorer
    result = call_in_child(llama_oracle.evaluate_with_gguf, folder / "model", eval_path, tmp_path, gguf)
    torch_rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").open()]
    gguf_rows = [json.loads(line) for line in (tmp_path / "predictions_scorer-f32.jsonl").open()]
    assert [r["raw"] for r in gguf_rows] == [r["raw"] for r in torch_rows]
    assert [r["predicted"] for r in gguf_rows] == [r["predicted"] for r in torch_rows]
    assert sum(r["predicted"] is not None for r in torch_rows) >= 4  # the model answers in the format
    engine = result["engines"]["scorer-f32.gguf"]
    assert engine["agreement"]["within_0_5"] == 1.0 and engine["examples_per_s"] > 0
    assert all(check["ok"] for check in engine["prompt_checks"]), engine["prompt_checks"]
    assert len(engine["prompt_checks"]) == 5
    report = (tmp_path / "eval_report.md").read_text()
    assert "## Engines side by side" in report and "| Agreement with torch (abs diff <= 0.5) | - | 100.0% |" in report
    assert "MISMATCH" not in report and "WARNING" not in report
    for name in ("scatter_model.svg", "bands_model.svg", "scatter_scorer-f32.gguf.svg", "bands_scorer-f32.gguf.svg"):
        assert (tmp_path / name).read_text().startswith("<svg") and f"]({name})" in report
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["engines"]["scorer-f32.gguf"]["parse_failures"] == saved["parse_failures"]


def test_altered_chat_template_is_caught(tmp_path, tokenizer):
    model = write_and_load(tmp_path, tokenizer)
    altered = sl.Tokenizer(tokenizer.backend, {**tokenizer.config, "chat_template": tokenizer.chat_template.replace(
        "message['role'] + '\\n'", "message['role'] + ' \\n'")})
    path = sl.export_gguf(model, altered, tmp_path / "altered.gguf", quant="f32", modelfile=False)
    checks = {c["server"]: c for c in call_in_child(llama_oracle.prompt_checks, path, tmp_path / "tok")}
    jinja = checks["llama-cpp-python Jinja (embedded template)"]
    assert not jinja["ok"] and "differs at token" in jinja["detail"]
    assert checks["our prompt, tokenized by the GGUF's vocabulary"]["ok"]


def test_altered_tokenizer_metadata_is_caught(tmp_path, tokenizer, monkeypatch):
    model = write_and_load(tmp_path, tokenizer)
    real = gguf_file.vocabulary

    def im_start_as_plain_text(tok, rows):
        tokens, types, merges = real(tok, rows)
        types[tok.im_start_id] = gguf_file.gguf.TokenType.NORMAL  # no longer parsed as a special token
        return tokens, types, merges

    monkeypatch.setattr(gguf_file, "vocabulary", im_start_as_plain_text)
    path = sl.export_gguf(model, tokenizer, tmp_path / "altered.gguf", quant="f32", system_prompt=SYSTEM_PROMPT)
    checks = call_in_child(llama_oracle.prompt_checks, path, tmp_path / "tok", tmp_path / "Modelfile")
    assert checks and not any(c["ok"] for c in checks)


def test_modelfile_that_repeats_the_system_prompt_is_caught(tmp_path, tokenizer):
    model = write_and_load(tmp_path, tokenizer)
    path = sl.export_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32", system_prompt=SYSTEM_PROMPT)
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(modelfile.read_text().replace(
        'TEMPLATE """', 'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'))
    checks = {c["server"]: c for c in call_in_child(llama_oracle.prompt_checks, path, tmp_path / "tok", modelfile)}
    assert not checks["Ollama (Modelfile TEMPLATE)"]["ok"]
    assert checks["llama.cpp chat formatting (embedded template)"]["ok"]


def write_and_load(tmp_path, tokenizer):
    write_hf_checkpoint(tmp_path / "hf", tiny_config(vocab_size=tokenizer.vocab_size))
    tokenizer.save_pretrained(tmp_path / "tok")
    return sl.load_model(tmp_path / "hf", dtype=torch.float32)


def test_go_template_renderer_reads_our_modelfile_as_ollama_does(tmp_path):
    messages = scoring_messages("Geophysicist.", "Oil", "Output rose.")
    modelfile.write_modelfile(tmp_path / "m.gguf", SYSTEM_PROMPT)
    assert ollama_prompt(tmp_path / "Modelfile", messages) == sl.render_prompt(messages)
    assert ollama_prompt(tmp_path / "Modelfile", messages[1:]) == sl.render_prompt(messages)  # SYSTEM fills in
    template = "{{- if .System }}S:{{ .System }}\n{{ end }}{{- range .Messages }}[{{ .Role }}] {{ .Content }}\n" \
               "{{- end }}{{ if .Tools }}tools{{ else }} done{{ end }}"
    values = {"System": "sys", "Messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}]}
    assert render_go_template(template, values) == "S:sys\n[user] hi[assistant] yo done"
    with pytest.raises(ValueError, match="unsupported template action"):
        render_go_template("{{ .Messages | len }}", values)
    with pytest.raises(ValueError, match="has no"):
        render_go_template("{{ if .System }}x", values)


def test_export_several_quants_scored_in_one_command(scorer, tmp_path):
    """`export --quant f16,q8_0,q4_k_m --eval-data`: three files, one table beside the torch model, and the
    Modelfile pointing at the smallest file within tolerance."""
    import subprocess
    import sys

    folder, eval_path, _ = scorer
    out = subprocess.run([sys.executable, "-m", "stratos_lite", "export", "--model", str(folder / "model"),
                          "--out", str(tmp_path / "scorer.gguf"), "--quant", "f16,q8_0,q4_k_m", "--eval-data",
                          str(eval_path), "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "24"],
                         check=True, capture_output=True, text=True).stdout
    names = [f"scorer-{q}.gguf" for q in ("f16", "q8_0", "q4_k_m")]
    assert all((tmp_path / name).is_file() for name in names)
    sizes = [(tmp_path / name).stat().st_size for name in names]
    assert sizes[0] > sizes[1] > sizes[2]
    rows = [line for line in out.splitlines() if line.startswith("| scorer-")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == names[::-1]  # smallest first
    chosen = out.split("smallest within tolerance (")[1].split("): ")[1].split()[0]
    assert chosen in names and (tmp_path / "Modelfile").read_text().startswith(f"FROM ./{chosen}")
    f16_row = next(row for row in rows if row.startswith("| scorer-f16.gguf"))
    agreement, divergence, within = f16_row.split(" | ")[-3:]
    assert agreement == "1.000" and within == "yes |"  # f16 answers as the torch model does
    q4_row = next(row for row in rows if row.startswith("| scorer-q4_k_m.gguf"))
    assert 0 <= float(divergence) < float(q4_row.split(" | ")[-2])  # and strays from it less than q4_k_m
    assert (tmp_path / "quant_eval" / "eval_report.md").is_file()


def test_quant_choice_takes_the_smallest_file_within_tolerance(tmp_path):
    from stratos_lite.export.quant_choice import format_quant_table, smallest_within

    def engine(name, size, spearman, failures):
        (tmp_path / name).write_bytes(b"x" * size)
        return {"file": str(tmp_path / name), "examples_per_s": 1.0, "spearman": spearman, "mae": 0.1,
                "direction_accuracy": 0.9, "parse_failures": failures, "agreement": {"within_0_5": 0.9}}

    result = {"spearman": 0.95, "mae": 0.1, "direction_accuracy": 0.9, "parse_failures": 0, "examples_per_s": 2.0,
              "engines": {"a-q8_0.gguf": engine("a-q8_0.gguf", 800, 0.95, 0),
                          "a-q6_k.gguf": engine("a-q6_k.gguf", 600, 0.935, 0),
                          "a-q4_k_m.gguf": engine("a-q4_k_m.gguf", 400, 0.94, 1)}}
    assert smallest_within(result).name == "a-q6_k.gguf"  # q4_k_m is smaller but fails to parse once
    assert smallest_within(result, tolerance=0.01).name == "a-q8_0.gguf"
    result["engines"]["a-q8_0.gguf"]["spearman"] = None
    assert smallest_within(result, tolerance=0.01) is None
    assert "no file is within tolerance" in format_quant_table(result, tolerance=0.01)
    result["spearman"] = None  # a torch model answering one score: only the same answers count
    assert smallest_within(result) is None
    result["engines"]["a-q6_k.gguf"]["agreement"]["within_0_5"] = 1.0
    assert smallest_within(result).name == "a-q6_k.gguf"


def test_of_two_files_of_one_size_the_nearer_to_the_model_is_chosen(tmp_path):
    """A quant with and without an importance matrix: the same tensors, a few metadata bytes apart; the one
    with the smaller next-token divergence from the torch model ranks first, whichever is a byte smaller."""
    from stratos_lite.export.quant_choice import quant_scores, smallest_within

    def engine(name, size, kl):
        (tmp_path / name).write_bytes(b"x" * size)
        return {"file": str(tmp_path / name), "examples_per_s": 1.0, "spearman": 0.95, "mae": 0.1,
                "direction_accuracy": 0.9, "parse_failures": 0, "agreement": {"within_0_5": 1.0}, "kl_divergence": kl}

    result = {"spearman": 0.95, "parse_failures": 0,
              "engines": {"q3": engine("s-q3_k_m.gguf", 10_000, 2.6e-5),
                          "q3i": engine("s-q3_k_m-imatrix.gguf", 10_040, 2.4e-5),
                          "q4": engine("s-q4_k_m.gguf", 12_000, 7e-6)}}
    assert [row.name for row in quant_scores(result)] == ["s-q3_k_m-imatrix.gguf", "s-q3_k_m.gguf", "s-q4_k_m.gguf"]
    assert smallest_within(result).name == "s-q3_k_m-imatrix.gguf"
    result["engines"]["q3i"]["kl_divergence"] = 3e-5
    assert smallest_within(result).name == "s-q3_k_m.gguf"
