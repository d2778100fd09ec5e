from __future__ import annotations

import pytest

from mtptune.data.tokenizers import QWEN3_5_SPECIAL_TOKENS


def test_qwen3_5_vocabulary_and_special_ids_match_the_contract(qwen):
    assert len(qwen) == 248_077
    ids = qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [248044, 248045, 248046, 248068, 248069]
    assert qwen.eos_token_id == 248046
    assert len(QWEN3_5_SPECIAL_TOKENS) == 33


def test_qwen3_5_round_trips_text_and_normalises_to_nfc(qwen):
    text = "Hello world! 你好，世界 12345\n\n  code()"
    assert qwen.decode(qwen.encode(text, add_special_tokens=False)) == text
    decomposed = "cafe\u0301"  # e + combining acute; the reference encoder NFC-normalises first
    assert qwen.encode(decomposed, add_special_tokens=False) == qwen.encode("café", add_special_tokens=False)
    assert qwen.encode("<think>", add_special_tokens=False) == [248068]


def test_qwen3_5_decoding_keeps_reasoning_and_tool_markup_but_skips_control_tokens(qwen):
    # what a server returns as `content`: `</think>` must survive for the reasoning to be found again
    ids = qwen.encode("<|im_start|>assistant\n<think>\nr\n</think>\n\n<tool_call>x</tool_call><|im_end|>")
    assert qwen.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nr\n</think>\n\n<tool_call>x</tool_call>"


def test_qwen3_5_template_generation_prompt_opens_thinking(qwen):
    msgs = [{"role": "user", "content": "Hi"}]
    on = qwen.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    off = qwen.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert off == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_smollm2_tokenizer_is_chatml_with_im_end_eos(smollm2):
    assert smollm2.eos_token == "<|im_end|>"
    assert smollm2.eos_token_id == 2
    assert len(smollm2) == 49152
    assert "<|im_start|>" in smollm2.chat_template


def test_one_loader_for_folders_without_broken_and_with_a_tokenizer(tmp_path, smollm2, caplog):
    from mtptune.data.tokenizers import load_tokenizer
    from mtptune.errors import DataError

    assert load_tokenizer(tmp_path) is None  # a model folder without tokenizer files: token ids only
    smollm2.save_pretrained(tmp_path / "good")
    assert load_tokenizer(tmp_path / "good").encode("Hello there", add_special_tokens=False) == [19556, 665]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot load the tokenizer in .*broken"):
        load_tokenizer(tmp_path / "broken")
    assert load_tokenizer(tmp_path / "broken", on_error="warn") is None  # the server: serve token-id prompts
    assert "only token-id prompts are accepted" in caplog.text
