"""Qwen3's own tokenizer and chat template (vendored in tests/data/qwen3) against our prompt builder, our
training data and our GGUF export; transformers and llama.cpp are the oracles."""

import json

import llama_oracle
import pytest
import torch
from conftest import tiny_config, write_hf_checkpoint
from isolation import call_in_child

import stratos_lite as sl
from stratos_lite.data.batch import IGNORE_INDEX
from stratos_lite.data.task import scoring_messages

transformers = pytest.importorskip("transformers")

RECORDS = [
    dict(profile_id="geo-kw", profile="Senior geophysicist, KOC Kuwait. Field: energy.", article_id="a1",
         title="Kuwait oil output rises", article="Kuwait Oil Company said output reached 2.9 million barrels.",
         score=7.5, reasoning="Energy story in the reader's country, on oil."),
    dict(profile_id="dev-de", profile="Spieleentwickler in München, liest über Förderung und Übernahmen.",
         article_id="a2", title="Zölle auf Grafikkarten", article="Die Größe des Marktes wächst.\n\nMehr dazu.",
         score=2.0, reasoning="Hardware prices touch game studios only at the edge.\nSecond line."),
    dict(profile_id="ar", profile="محلل مالي في دبي يتابع أسواق الطاقة", article_id="a3",
         title="石油价格上涨 🛢️", article="国际油价周二上涨3%，布伦特原油报每桶84.12美元。👩‍👩‍👧‍👦",
         score=10.0, reasoning="  leading spaces and an emoji 🏳️‍🌈 stay as written  "),
    dict(profile_id="code", profile="Python developer\twho maintains CI", article_id="a4",
         title="def f(x):\r\n    return x ** 2", article="for i in range(10):\n\tprint(i)  # 1234567890",
         score=0.0, reasoning="Nothing to do with the reader."),
]

CORPUS = [
    "مرحبا بالعالم، هذه جملة عربية مع أرقام ١٢٣ و 456.",
    "人工智能正在改变世界。我们今天讨论大语言模型的微调。",
    "Größere Übungen für Bären: Öl, Äpfel und die Straße. ÄÖÜ äöü ß",
    "Family 👩‍👩‍👧‍👦, flag 🏳️‍🌈, skin tone 👍🏽 and keycap 1️⃣ sequences.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "Digits 1234567890 3.14159265358979 2026-11-29 0x7fffffff 1,000,000",
    "tabs\t\tand\tCRLF\r\nlines\r\n\r\n   leading and    inner   runs   \n\n\n  trailing  ",
    "Contractions: don't, I'll, we're, they've, she'd, it's. URLs: https://example.com/a?b=c&d=e",
    "Русский текст, 한국어 문장, 日本語の文章、हिन्दी वाक्य.",
]

CHATML = "<|im_start|>system\nYou score.<|im_end|>\n<|im_start|>user\nRate this.<|im_end|>\n" \
         "<|im_start|>assistant\n<think>\nok\n</think>\n\n{\"score\": 3}<|im_end|>\n<|endoftext|>"


@pytest.fixture(scope="module")
def hf_tokenizer(qwen3_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


def hf_chat_ids(hf_tokenizer, messages: list[dict], **options) -> list[int]:
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, **options)
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_from_pretrained_reads_qwen3_files(qwen3_tokenizer, qwen3_tokenizer_dir):
    tok = qwen3_tokenizer
    assert (tok.eos_id, tok.decode([tok.eos_id])) == (151645, "<|im_end|>")
    assert (tok.pad_id, tok.decode([tok.pad_id])) == (151643, "<|endoftext|>")
    assert (tok.im_start_id, tok.bos_id) == (151644, None)
    assert tok.token_id("<think>") == 151667 and tok.token_id("</think>") == 151668
    assert tok.vocab_size == 151669
    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text())
    assert tok.chat_template == config["chat_template"]


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_training_ids_equal_qwen3_chat_template(tmp_path, qwen3_tokenizer, hf_tokenizer, index):
    record = RECORDS[index]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n")
    example = sl.ScoredDataset.from_jsonl(path, qwen3_tokenizer, max_len=4096).examples[0]

    prompt = scoring_messages(record["profile"], record["title"], record["article"])
    assistant = f"<think>\n{record['reasoning']}\n</think>\n\n{json.dumps({'score': record['score']})}"
    messages = [{"role": m.role, "content": m.content} for m in prompt] + [{"role": "assistant", "content": assistant}]
    expected = hf_chat_ids(hf_tokenizer, messages)
    assert hf_tokenizer.decode(expected[-1:]) == "\n"  # the template closes the turn with a newline
    assert example.input_ids.tolist() == expected[:-1]

    labelled = (example.labels != IGNORE_INDEX).nonzero()[:, 0]
    first, last = int(labelled[0]), int(labelled[-1])
    assert example.input_ids[first] == 151667 and last == len(example.input_ids) - 1  # <think> .. <|im_end|>
    assert example.input_ids[last] == 151645 and len(labelled) == last - first + 1
    assert example.input_ids[:first].tolist() == hf_chat_ids(hf_tokenizer, messages[:-1], add_generation_prompt=True)


def test_inference_prompt_equals_generation_prompt(qwen3_tokenizer, hf_tokenizer):
    for record in RECORDS:
        prompt = scoring_messages(record["profile"], record["title"], record["article"])
        messages = [{"role": m.role, "content": m.content} for m in prompt]
        assert qwen3_tokenizer.encode_prompt(prompt) == hf_chat_ids(hf_tokenizer, messages, add_generation_prompt=True)


@pytest.fixture(scope="module")
def real_vocab_gguf(tmp_path_factory, qwen3_tokenizer):
    folder = tmp_path_factory.mktemp("real-vocab")
    config = tiny_config(vocab_size=151936, tie_word_embeddings=True, eos_token_id=151645)
    write_hf_checkpoint(folder / "hf", config)
    model = sl.load_model(folder / "hf", dtype=torch.float32)
    return sl.export_gguf(model, qwen3_tokenizer, folder / "real-vocab-q8_0.gguf", quant="q8_0")


def test_llama_cpp_tokenizes_as_hf_does(real_vocab_gguf, qwen3_tokenizer, hf_tokenizer):
    expected = [hf_tokenizer(text, add_special_tokens=False)["input_ids"] for text in CORPUS]
    assert [qwen3_tokenizer.encode(text) for text in CORPUS] == expected
    got = call_in_child(llama_oracle.tokenize, real_vocab_gguf, CORPUS, special=False)
    for text, ours, theirs in zip(CORPUS, got, expected, strict=True):
        assert ours == theirs, text
    assert call_in_child(llama_oracle.detokenize, real_vocab_gguf, got, special=False) == CORPUS


def test_llama_cpp_parses_chatml_specials_as_single_tokens(real_vocab_gguf, hf_tokenizer):
    expected = hf_tokenizer(CHATML, add_special_tokens=False)["input_ids"]
    [got] = call_in_child(llama_oracle.tokenize, real_vocab_gguf, [CHATML], special=True)
    assert got == expected
    assert got.count(151644) == 3 and got.count(151645) == 3 and got[-1] == 151643
    assert 151667 in got and 151668 in got  # <think> and </think>, one token each
    assert call_in_child(llama_oracle.detokenize, real_vocab_gguf, [got], special=True) == [CHATML]
    [plain] = call_in_child(llama_oracle.tokenize, real_vocab_gguf, ["<|im_start|>"], special=False)
    assert len(plain) > 1  # without special=True the marker is text, as llama.cpp documents


def test_gguf_carries_qwen3_vocabulary_and_chat_template(real_vocab_gguf, qwen3_tokenizer):
    meta = call_in_child(llama_oracle.metadata, real_vocab_gguf)
    assert meta["tokenizer.chat_template"] == qwen3_tokenizer.chat_template
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert int(meta["tokenizer.ggml.eos_token_id"]) == 151645
    assert int(meta["tokenizer.ggml.padding_token_id"]) == 151643
