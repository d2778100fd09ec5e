"""Prompt sets: the built-in GSM8K / MT-Bench from the offline data packages, text and token-id files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtptune.errors import DataError
from mtptune.evaluation.prompts import Prompt, encode_prompt, load_prompts


def test_builtin_prompt_sets() -> None:
    gsm8k = load_prompts("gsm8k", limit=3)
    assert len(gsm8k) == 3 and gsm8k[0].text.startswith("Janet")
    mt_bench = load_prompts("mt_bench")
    assert len(mt_bench) == 80
    assert mt_bench[0].prompt_id == "mt_bench:81" and "Hawaii" in mt_bench[0].text  # first turn only


def test_prompt_files(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert [p.text for p in load_prompts(str(txt))] == ["first", "second"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"prompt_token_ids": [1, 2, 3]}\n'
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}\n'
    )
    ids, chat = load_prompts(str(jsonl))
    assert encode_prompt(ids, tokenizer=None) == [1, 2, 3]
    assert chat.text == "hi"
    with pytest.raises(DataError, match="no tokenizer"):
        encode_prompt(Prompt("x", text="hello"), tokenizer=None)
    with pytest.raises(DataError, match="neither a built-in set"):
        load_prompts(str(tmp_path / "nope.jsonl"))
