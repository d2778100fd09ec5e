"""Prompt sets: the built-in GSM8K / MT-Bench from the offline data packages, text and token-id files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtptune.errors import DataError
from mtptune.evaluation.prompts import Prompt, encode_turn, gsm8k_split, load_prompts, load_tokenizer


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
    assert encode_turn(ids, [], tokenizer=None) == [1, 2, 3]
    assert chat.text == "hi"
    with pytest.raises(DataError, match="no tokenizer"):
        encode_turn(Prompt("x", text="hello"), [], tokenizer=None)
    with pytest.raises(DataError, match="neither a built-in set"):
        load_prompts(str(tmp_path / "nope.jsonl"))


def test_gsm8k_splits_are_fixed_and_disjoint() -> None:
    held, train, everything = load_prompts("gsm8k_heldout"), load_prompts("gsm8k_train"), load_prompts("gsm8k")
    assert (len(held), len(train)) == (200, 1119)
    assert not {p.prompt_id for p in held} & {p.prompt_id for p in train}
    train_ids, held_ids = gsm8k_split(len(everything))
    assert [p.text for p in held] == [everything[i].text for i in held_ids]  # in split order
    assert [p.text for p in train] == [everything[i].text for i in train_ids]
    assert held_ids[:3] == [1097, 1209, 704]  # the split of issues 7 and 21: never changes
    assert load_prompts("gsm8k_heldout", limit=5) == held[:5]


def test_mt_bench_both_turns_and_the_rendered_second_turn() -> None:
    first, both = load_prompts("mt_bench", limit=2), load_prompts("mt_bench", limit=2, turns="all")
    assert [p.num_turns for p in first] == [1, 1] and [p.num_turns for p in both] == [2, 2]
    assert both[0].text == first[0].text and both[0].followups[0].startswith("Rewrite your previous response")
    tokenizer = load_tokenizer("qwen3.5")
    second = tokenizer.decode(encode_turn(both[0], ["ALOHA ANSWER"], tokenizer))
    # The verifier's own answer sits between the two user turns, and a generation prompt follows the second.
    assert second.index(both[0].text) < second.index("ALOHA ANSWER") < second.index(both[0].followups[0])
    assert second.rstrip().endswith(("<|im_start|>assistant", "<think>"))
    assert tokenizer.decode(encode_turn(both[0], [], tokenizer)) == tokenizer.decode(
        encode_turn(first[0], [], tokenizer)
    )
    with pytest.raises(DataError, match="has 2 turn"):
        encode_turn(both[0], ["a", "b"], tokenizer)


def test_messages_rows_keep_their_later_user_turns(tmp_path: Path) -> None:
    chat, sharegpt = tmp_path / "chat.jsonl", tmp_path / "sharegpt.jsonl"
    chat.write_text(
        '{"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "ref"}, '
        '{"role": "user", "content": "two"}]}\n'
    )
    sharegpt.write_text(
        '{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}, '
        '{"from": "human", "value": " "}]}\n'
    )
    (prompt,) = load_prompts(str(chat), turns="all")
    assert (prompt.text, prompt.followups) == ("one", ("two",))  # the reference answer "ref" is never used
    assert load_prompts(str(sharegpt), turns="first")[0].followups == ()
    with pytest.raises(DataError, match="empty user turn"):
        load_prompts(str(sharegpt), turns="all")
