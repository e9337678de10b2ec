"""The one ChatML prompt builder: exact text layout and token ids."""

import pytest

from stratos_lite import Message, render_completion, render_prompt

MESSAGES = [Message("system", "You score news relevance."), Message("user", "Profile: geophysicist.\nArticle: oil")]


def test_prompt_text_is_qwen3_chatml():
    assert render_prompt(MESSAGES) == (
        "<|im_start|>system\nYou score news relevance.<|im_end|>\n"
        "<|im_start|>user\nProfile: geophysicist.\nArticle: oil<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_completion_text_has_think_block_then_answer():
    assert render_completion('{"score": 7.5}', reasoning="\nOil matters here.\n") == (
        '<think>\nOil matters here.\n</think>\n\n{"score": 7.5}<|im_end|>'
    )
    assert render_completion("plain") == "plain<|im_end|>"


def test_chat_ids_equal_encoding_of_the_whole_text(tokenizer):
    completion = render_completion('{"score": 2.0}', reasoning="Tangential: region matches, field does not.")
    chat = tokenizer.encode_chat(MESSAGES, completion)
    assert chat.input_ids == tokenizer.encode(render_prompt(MESSAGES) + completion)
    assert chat.input_ids[: chat.prompt_length] == tokenizer.encode_prompt(MESSAGES)
    assert chat.input_ids[-1] == tokenizer.im_end_id
    think = tokenizer.token_id("<think>")
    assert chat.input_ids[chat.prompt_length] == think  # <think> is one token, not spelled out
    assert tokenizer.decode(chat.input_ids) == render_prompt(MESSAGES) + completion


def test_specials_and_stop_ids(tokenizer):
    assert tokenizer.eos_id == tokenizer.im_end_id
    assert tokenizer.im_end_id in tokenizer.stop_ids
    assert tokenizer.token_id("<|endoftext|>") == tokenizer.pad_id
    assert tokenizer.bos_id is None


def test_unknown_role_and_assistant_in_prompt_are_rejected():
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        Message("tool", "x")
    with pytest.raises(ValueError, match="assistant"):
        render_prompt([Message("assistant", "x")])
