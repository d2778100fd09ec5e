"""prepare end to end: token-id rows on a tiny verifier without tokenizer, bad input, overwrite, the gsm8k preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtptune.cli.main import main
from mtptune.data.prepare import load_prepared, prepare_dataset
from mtptune.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def good(n: int, supervised: int = 2) -> dict:
    return {"input_ids": list(range(1, n + 1)), "loss_mask": [0] * (n - supervised) + [1] * supervised}


def test_token_rows_pass_through_with_every_drop_counted(tmp_path, tiny_verifier):
    data = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            good(6),
            good(12, supervised=8),  # truncated to 8, keeps 4 supervised
            {"input_ids": [1, 2, 3], "loss_mask": [0, 1]},  # length mismatch
            {"input_ids": [1, 999, 1000], "loss_mask": [0, 1, 1]},  # 1000 >= vocab 1000
            {"input_ids": [1, 2], "loss_mask": [0, 0]},  # nothing supervised
            {"input_ids": [1, 2]},  # missing loss_mask
            {"text": "hello"},  # no known fields
            {"input_ids": list(range(1, 13)), "loss_mask": [0] * 10 + [1, 1]},  # supervision cut by truncation
        ],
    )
    report = prepare_dataset(str(tiny_verifier), [str(data)], tmp_path / "out", seq_length=8)
    assert (report.rows_in, report.rows_out, report.truncated) == (8, 2, 1)
    assert report.dropped == {
        "length_mismatch": 1,
        "id_out_of_range": 1,
        "no_supervised_tokens": 2,
        "missing_field": 2,
    }
    assert any(":3:" in e for e in report.drop_examples["length_mismatch"])  # file:line of the bad row
    assert "after truncation to 8" in " ".join(report.drop_examples["no_supervised_tokens"])
    ds = load_prepared(tmp_path / "out")
    assert sorted(ds["seq_len"]) == [6, 8]
    row = ds[next(i for i, n in enumerate(ds["seq_len"]) if n == 8)]
    assert row["input_ids"] == list(range(1, 9)) and row["loss_mask"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert str(ds.features["input_ids"].feature.dtype) == "int64"
    freq = torch.load(tmp_path / "out" / "token_freq.pt")
    assert freq == {5: 2, 6: 2, 7: 1, 8: 1}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows_out"] == 2 and saved["supervised_tokens_total"] == 6 and saved["tokens_total"] == 14
    assert sum(saved["length_histogram"].values()) == 2


def test_malformed_json_line_names_file_and_line(tmp_path, tiny_verifier):
    data = write_jsonl(tmp_path / "bad.jsonl", [good(4), "{not json", good(4)])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        prepare_dataset(str(tiny_verifier), [str(data)], tmp_path / "out")


def test_json_list_rows_carry_their_line(tmp_path, tiny_verifier):
    (tmp_path / "rows.json").write_text('[\n  {"input_ids": [1, 2], "loss_mask": [0, 1]},\n  {"input_ids": [1]}\n]\n')
    report = prepare_dataset(str(tiny_verifier), [str(tmp_path / "rows.json")], tmp_path / "out")
    assert report.rows_out == 1 and report.drop_examples["missing_field"][0].startswith(f"{tmp_path}/rows.json:3")


def test_empty_and_all_dropped_datasets_are_errors(tmp_path, tiny_verifier):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty dataset"):
        prepare_dataset(str(tiny_verifier), [str(empty)], tmp_path / "a")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [5000], "loss_mask": [1]}])
    with pytest.raises(DataError, match="id_out_of_range"):
        prepare_dataset(str(tiny_verifier), [str(bad)], tmp_path / "b")
    with pytest.raises(DataError, match="no tokenizer"):
        chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
        prepare_dataset(str(tiny_verifier), [str(chat)], tmp_path / "c")


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_verifier):
    data = write_jsonl(tmp_path / "rows.jsonl", [good(4), good(5)])
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)  # the trainer's files share the dir and must survive
    prepare_dataset(str(tiny_verifier), [str(data)], out)
    with pytest.raises(DataError, match="--overwrite"):
        prepare_dataset(str(tiny_verifier), [str(data)], out)
    report = prepare_dataset(str(tiny_verifier), [str(data)], out, overwrite=True, max_samples=1)
    assert report.rows_out == 1 and len(load_prepared(out)) == 1
    assert (out / "checkpoints").is_dir()


def test_load_prepared_rejects_a_folder_that_is_not_prepared(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_prepared(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_prepared(tmp_path / "nope")


def test_workers_give_the_same_rows(tmp_path, tiny_verifier):
    rows = [good(3 + i % 7, supervised=1 + i % 2) for i in range(40)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    one = prepare_dataset(str(tiny_verifier), [str(data)], tmp_path / "one", seed=3)
    two = prepare_dataset(str(tiny_verifier), [str(data)], tmp_path / "two", seed=3, num_workers=2)
    assert one.rows_out == two.rows_out == 40
    assert load_prepared(tmp_path / "one")["input_ids"] == load_prepared(tmp_path / "two")["input_ids"]


def test_gsm8k_preset_to_prepared_dataset_for_smollm2_via_the_cli(tmp_path, capsys):
    out = tmp_path / "gsm8k"
    argv = ["prepare", "--model", "smollm2", "--data", "gsm8k", "--output", str(out), "--max-samples", "50"]
    assert main([*argv, "--seq-length", "512"]) == 0
    assert "1319 rows in -> 50 rows out" in capsys.readouterr().out
    ds = load_prepared(out)
    assert len(ds) == 50
    report = json.loads((out / "report.json").read_text())
    assert report["formats"] == {"chat": 50} and report["rows_not_used"] == 1269
    # every row ends with the supervised answer "... #### N<|im_end|>" followed by ChatML's unsupervised "\n"
    for ids, mask in zip(ds["input_ids"], ds["loss_mask"]):
        assert mask[-1] == 0 and ids[-1] == 198 and (mask[-2], ids[-2]) == (1, 2)
    assert main(argv) == 2  # refuses the existing output
    assert "--overwrite" in capsys.readouterr().err


def test_prepare_data_script_accepts_the_tutorial_flags(tmp_path, tiny_verifier):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [good(10), good(20)])
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--model", str(tiny_verifier)]
    cmd += ["--data", str(data), "--output", str(tmp_path / "output"), "--max-samples", "5000"]
    cmd += ["--seq-length", "8192", "--seed", "0", "--minimum-valid-tokens", "2", "--num-preprocessing-workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(load_prepared(tmp_path / "output")) == 2


def chat(*turns: str, reasoning: str | None = None) -> dict:
    """A conversation of alternating user/assistant contents."""
    roles = ("user", "assistant")
    messages = [{"role": roles[k % 2], "content": text} for k, text in enumerate(turns)]
    if reasoning is not None:
        messages[-1]["reasoning_content"] = reasoning
    return {"messages": messages}


def test_conversations_are_one_row_each_unless_the_template_rewrites_history(tmp_path, smollm2):
    rows = [
        chat("Hi", "Yo", "Again?", "Sure", "Once more?", "Done"),  # 3 assistant turns
        chat("Q", "A"),
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    model = tmp_path / "smollm2"  # its tokenizer as a folder: loads faster than from the GGUF
    smollm2.save_pretrained(str(model))
    whole = prepare_dataset(str(model), [str(data)], tmp_path / "conv")  # ChatML renders history as it was
    assert whole.rows_out == 2
    assert whole.chat_rows == {"conversation_rows": 2, "turn_rows": 0, "conversations_split": 0}
    turns = prepare_dataset(str(model), [str(data)], tmp_path / "turn", one_row_per="turn")
    assert turns.rows_out == 4
    assert turns.chat_rows == {"conversation_rows": 0, "turn_rows": 4, "conversations_split": 0}
    assert whole.supervised_tokens_total == turns.supervised_tokens_total  # the same supervision...
    assert whole.tokens_total < turns.tokens_total  # ...with each prefix processed once
    saved = json.loads((tmp_path / "conv" / "report.json").read_text())
    assert saved["chat_rows"] == whole.chat_rows and saved["settings"]["one_row_per"] == "conversation"


def test_qwen3_5_multi_turn_conversations_fall_back_to_turn_rows_and_are_counted(tmp_path, qwen, caplog):
    rows = [chat("Hi", "A1", "Q2", "A2", reasoning="r2"), chat("Q", "A", reasoning="r")]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    report = prepare_dataset("qwen3.5", [str(data)], tmp_path / "out")
    # Qwen's template renders an answer differently once a later user message follows: exact only per turn
    assert report.chat_rows == {"conversation_rows": 1, "turn_rows": 2, "conversations_split": 1}
    assert report.rows_out == 3 and report.dropped == {}
    assert "1 conversation(s) are not rendered prefix-stably" in caplog.text and "chat.jsonl:1" in caplog.text
    assert "1 conversation rows, 2 turn rows" in report.summary()
    supervised = sorted(qwen.decode([t for t, m in zip(i, k) if m]) for i, k in zip(*load_columns(tmp_path / "out")))
    assert supervised == sorted(["A1<|im_end|>", "r2\n</think>\n\nA2<|im_end|>", "r\n</think>\n\nA<|im_end|>"])


def load_columns(path: Path) -> tuple[list[list[int]], list[list[int]]]:
    ds = load_prepared(path)
    return ds["input_ids"], ds["loss_mask"]


LATIN1_ROW = '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1")  # é as the byte 0xe9


@pytest.mark.parametrize("command", ["prepare", "regenerate"])
def test_a_file_that_is_not_utf8_is_a_one_line_error_naming_file_and_line(tmp_path, tiny_verifier, command, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps(good(4)).encode() + b"\n" + LATIN1_ROW + b"\n")
    out = tmp_path / ("out" if command == "prepare" else "out.jsonl")
    argv = ["--data", str(data), "--output", str(out)]
    argv += ["--model", str(tiny_verifier)] if command == "prepare" else ["--endpoint", "http://127.0.0.1:9/v1"]
    assert main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [message] = err.strip().splitlines()
    assert message.startswith(f"mtptune {command}: error: {data}:2: not valid UTF-8 (byte 0xe9 at byte 47 ")
    assert "iconv" in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["latin1.jsonl"]


def test_json_list_not_utf8_names_its_line_and_a_bom_is_accepted(tmp_path, tiny_verifier):
    bad = tmp_path / "rows.json"
    bad.write_bytes(b"[\n  " + json.dumps(good(3)).encode() + b",\n  " + LATIN1_ROW + b"\n]\n")
    with pytest.raises(DataError, match=r"rows\.json:3: not valid UTF-8"):
        prepare_dataset(str(tiny_verifier), [str(bad)], tmp_path / "a")
    bom = write_jsonl(tmp_path / "bom.jsonl", [good(3), good(4)])
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())  # as some editors save UTF-8
    assert prepare_dataset(str(tiny_verifier), [str(bom)], tmp_path / "b").rows_out == 2


def test_a_failed_prepare_leaves_no_output_and_keeps_an_earlier_dataset(tmp_path, tiny_verifier):
    dropped = write_jsonl(tmp_path / "dropped.jsonl", [{"input_ids": [5000], "loss_mask": [1]}])
    out = tmp_path / "runs" / "prepared"
    with pytest.raises(DataError, match="every row was dropped"):
        prepare_dataset(str(tiny_verifier), [str(dropped)], out)
    assert not (tmp_path / "runs").exists()  # not even the parent folder

    data = write_jsonl(tmp_path / "rows.jsonl", [good(4), good(5)])
    prepare_dataset(str(tiny_verifier), [str(data)], out)
    (out / "checkpoints").mkdir()
    with pytest.raises(DataError, match="every row was dropped"):  # --overwrite with bad data: the old one stays
        prepare_dataset(str(tiny_verifier), [str(dropped)], out, overwrite=True)
    assert len(load_prepared(out)) == 2
    prepare_dataset(str(tiny_verifier), [str(data)], out, overwrite=True, max_samples=1)
    assert len(load_prepared(out)) == 1 and (out / "checkpoints").is_dir()
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # no staging folder left beside it
    assert len(list(out.glob("*.arrow"))) == 1 and (out / "report.json").is_file()
