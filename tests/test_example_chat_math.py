"""Issue 21's example scripts without a model (fast): the ShareGPT subset of the chat + math mix never holds an
evaluation prompt, examples/smollm2_chat_math/run.py is smollm2_gsm8k/run.py with the mix's defaults, and one
results row per run renders into docs/results.md's tables."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chat_math():
    return _load("chat_math_run", REPO / "examples/smollm2_chat_math/run.py")


@pytest.fixture(scope="module")
def gsm8k_run():
    return _load("smollm2_run_for_chat", REPO / "examples/smollm2_gsm8k/run.py")


@pytest.fixture(scope="module")
def chat_data(gsm8k_run):
    return sys.modules["chat_data"]  # imported by run.py from its own folder


@pytest.fixture(scope="module")
def table(gsm8k_run):
    return sys.modules["results_table"]


def _conv(cid: str, *turns: str, lead: bool = False) -> dict:
    messages = [{"from": "gpt", "value": "answer to an earlier part"}] if lead else []
    for t in turns:
        messages += [{"from": "human", "value": t}, {"from": "gpt", "value": "reference, never used"}]
    return {"id": cid, "conversations": messages}


def test_sharegpt_subset_filters_and_never_holds_an_evaluation_prompt(chat_data) -> None:
    mtbench = ["Compose an engaging travel blog post about Hawaii.", "Rewrite it with every sentence starting A."]
    gsm8k = ["Janet has 3 ducks. How many eggs?", "Tom runs 5 miles. How far in a week?"]
    conversations = [
        _conv("ok1", "Explain recursion.", "Now in Python."),
        _conv("ok2", "Hi", lead=True),  # the leading answer has nothing to answer: dropped, the rest kept
        _conv("mtb", "please: compose an engaging   travel blog post about hawaii. thanks"),  # contains a turn
        _conv("held", "Tom runs 5 miles. How far in a week?"),  # a held-out question (index 1)
        _conv("test", "Janet has 3 ducks. How many eggs?"),  # a GSM8K test question, whole
        _conv("long", "x" * (chat_data.MAX_TURN_CHARS + 1)),
        _conv("zh", "请解释递归。这是一个很长的中文问题。"),
        _conv("empty", "   "),
        _conv("cut", "one", "", "three"),  # stops at the empty turn
        _conv("many", "1", "2", "3", "4", "5"),
    ]
    rows, report = chat_data.build_subset(conversations, mtbench, gsm8k, held_out=[1], size=100)
    by_id = {r["id"]: r["turns"] for r in rows}
    assert by_id == {
        "sharegpt-ok1": ["Explain recursion.", "Now in Python."],
        "sharegpt-ok2": ["Hi"],
        "sharegpt-cut": ["one"],
        "sharegpt-many": ["1", "2", "3"][: chat_data.MAX_TURNS],
    }
    assert report["dropped"] == {"evaluation_prompt": 3, "no_user_turn": 1, "not_english": 1, "turn_too_long": 1}
    assert chat_data.build_subset(conversations, mtbench, gsm8k, [1], size=100)[0] == rows  # seeded: same order
    assert len(chat_data.build_subset(conversations, mtbench, gsm8k, [1], size=2)[0]) == 2


def test_chat_math_is_the_gsm8k_script_with_the_mix_defaults(chat_math, gsm8k_run) -> None:
    args = gsm8k_run.parse_args(chat_math.compose([]))
    assert (args.chat_samples, args.chat_max_turns, args.mtbench_turns, args.eval_temperatures) == (2000, 2, 2, [0.0, 0.7])  # fmt: skip
    assert (args.train_samples, args.test_samples, args.generate_samples, args.mtbench_samples) == (0, 200, 200, 80)
    assert args.train_args == "--warmup-steps 30" and args.loss == "kl"
    tiny = gsm8k_run.parse_args(chat_math.compose(["--tiny", "--epochs", "2"]))
    assert (tiny.chat_samples, tiny.train_samples, tiny.epochs, tiny.eval_workers) == (4, 6, 2, 2)
    assert tiny.work_dir == "runs/smollm2_chat_math_tiny" and tiny.mtbench_turns == 2


def _results(name: str, al: float) -> dict:
    def entry(a: float, prompts: int | None = None, turns: bool = False) -> dict:
        p = [(a - 1) / 2, (a - 1) / 4, 0.0]
        out = {"acceptance_length": a, "per_position": p, "conditional": [0.5, 0.5, 0.0], "drafts": 1000}
        if prompts:
            out["generation"] = {"prompts": prompts * (2 if turns else 1), "conversations": prompts, "temperature": 0}
        if turns:
            out["by_turn"] = [{"acceptance_length": a + 0.1, "per_position": p, "drafts": 500}] * 2
        return out

    return {
        "name": name,
        "status": "done",
        "data": {"train_rows": 4476, "train_questions": 1119, "supervised_tokens": 851000, "chat_conversations": 0},
        "trained": {
            "offline_gsm8k": entry(al),
            "offline_gsm8k_k4": entry(al),
            "generate_gsm8k": entry(al, 200),
            "generate_mt_bench": entry(1.2, 80, turns=True),
            "generate_gsm8k_T0.7": {"skipped": "time budget (3 s left)"},
        },
        "untrained": {"offline_gsm8k": entry(1.0)},
        "training": {"validation": [{"epoch": 0, "tau_sim": 1.0}, {"epoch": 1, "tau_sim": 1.9}]},
        "stages": [{"stage": "train", "seconds": 197.0}],
    }


def test_results_rows_replace_per_run_and_render(table, gsm8k_run, tmp_path) -> None:
    args = gsm8k_run.parse_args(["--epochs", "6", "--loss", "kl", "--answers-per-question", "4", "--lr", "1.5e-3"])
    rows = tmp_path / "rows.jsonl"
    table.write_row(rows, table.row(_results("a", 2.5), args))
    table.write_row(rows, table.row(_results("b", 2.0), args))
    table.write_row(rows, table.row(_results("a", 2.7), args))  # the same run again: its row is replaced
    read = table.read_rows([rows])
    assert [r["name"] for r in read] == ["b", "a"] and read[1]["figures"]["trained"]["offline_gsm8k"]["acceptance_length"] == 2.7  # fmt: skip
    assert "offline_gsm8k_k4" not in read[1]["figures"]["trained"]
    figures = table.figures_table(read)
    assert "| a | GSM8K held-out, T=0 (lossless check) | 200 prompts, 1,000 drafts | **2.70** | 0.850 / 0.425 / 0.000" in figures  # fmt: skip
    assert "160 turns of 80 conversations" in figures and "| 1.30 / 1.30 |" in figures  # MT-Bench turns apart
    assert "| skipped |" in figures and "| 1.00 |" in figures  # a budget-cut figure; the fresh head beside
    levers = table.levers_table(read)
    assert "| a | 1119 GSM8K q × 4; 4476 rows, 851,000 supervised tokens | 6 | kl | 3 | 0.0015 |" in levers
    assert "| 1,000 drafts | **2.70** |" in figures  # offline: drafts only
    assert "a: validation tau_sim 1.00, 1.90" in table.curves(read)
    json.dumps(read)  # rows stay plain JSON


def test_results_row_of_a_real_args_namespace_has_every_lever(table) -> None:
    args = argparse.Namespace(**{k: 1 for k in table.LEVERS})
    assert set(table.row({"name": "x"}, args)["levers"]) == set(table.LEVERS)


def test_jsonl_with_unicode_line_separators_in_text_reads_back(chat_data, tmp_path) -> None:
    rows = [{"id": "sharegpt-x", "turns": ["a\u2028b\x85c\u2029d"]}, {"id": "sharegpt-y", "turns": ["e"]}]
    chat_data.write_jsonl_gz(tmp_path / "s.jsonl.gz", rows)  # ensure_ascii=False: the separators stay raw
    assert chat_data.read_jsonl(tmp_path / "s.jsonl.gz") == rows
