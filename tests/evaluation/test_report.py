"""Reports: JSON round trip, CSV, PNG (with training curves), the terminal table, and the CLI end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mtptune.cli.main import main
from mtptune.evaluation.report import format_table, read_training_curves, write_report
from mtptune.evaluation.result import EvaluationResult, GenerationStats
from mtptune.metrics.acceptance import AcceptanceCounts

from .trained_tiny import NUM_STEPS, TinySetup

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def result(accepted: list[int], method: str = "offline", **kwargs) -> EvaluationResult:
    return EvaluationResult(method, "head", "verifier", "data", AcceptanceCounts(3, 100, accepted), rows=5, **kwargs)


def test_report_files_round_trip(tmp_path: Path) -> None:
    generation = GenerationStats(
        prompts=5,
        generated_tokens=200,
        baseline_generated_tokens=200,
        verifier_steps=80,
        baseline_verifier_steps=200,
        seconds=2.0,
        baseline_seconds=4.0,
        temperature=0.0,
        lossless_checked=True,
    )
    after = result([80, 60, 40], "generate", generation=generation)
    before = result([30, 10, 5], label_accuracy=[0.3, 0.1, 0.05])
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text(
        "".join(
            json.dumps({"split": "val", "step": s, "loss": 1 / (s + 1), "tau_sim": 1 + s / 10}) + "\n" for s in range(5)
        )
    )
    files = write_report(tmp_path / "report", after, before, training_metrics=metrics.parent)
    assert read_training_curves(metrics)["val/tau_sim"][-1] == (4.0, pytest.approx(1.4))
    assert EvaluationResult.load(files.result) == after
    assert EvaluationResult.load(tmp_path / "report") == after
    assert EvaluationResult.load(files.baseline) == before
    with files.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["label"], r["position"]) for r in rows][:4] == [
        ("before", "0"),
        ("before", "1"),
        ("before", "2"),
        ("after", "0"),
    ]
    assert float(rows[3]["p"]) == pytest.approx(0.8)
    assert files.plot is not None and files.plot.read_bytes()[:8] == PNG_MAGIC
    body = json.loads(files.result.read_text())
    assert body["acceptance_length"] == pytest.approx(2.8)
    assert body["generation"]["speedup"] == pytest.approx(2.0)


def test_table_shows_both_results_side_by_side() -> None:
    table = format_table([("before", result([30, 10, 5])), ("after", result([80, 60, 40]))])
    lines = table.splitlines()
    assert lines[0].split() == ["before", "after"]
    al = next(line for line in lines if line.startswith("acceptance length"))
    assert al.split()[-2:] == ["1.450", "2.800"]


def test_cli_offline_generate_compare(tiny: TinySetup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"input_ids": r.input_ids.tolist(), "loss_mask": r.loss_mask.tolist()}) + "\n"
            for r in tiny.eval_rows[:3]
        )
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in tiny.eval_prompts[:2]))
    run_dir = tmp_path / "run"  # a training run root resolves to its checkpoint_best
    run_dir.mkdir()
    (run_dir / "checkpoint_best").symlink_to(tiny.trained_head, target_is_directory=True)
    head = ["--head", str(run_dir), "--verifier", str(tiny.verifier_dir)]
    offline = ["evaluate", "offline", *head, "--baseline-head", str(tiny.random_head), "--data", str(rows)]
    assert main([*offline, "--output", str(tmp_path / "off")]) == 0
    generate = ["evaluate", "generate", *head, "--prompts", str(prompts), "--max-new-tokens", "12"]
    assert main([*generate, "--num-steps", str(NUM_STEPS), "--output", str(tmp_path / "gen"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "lossless checked" in out
    assert {p.name for p in (tmp_path / "off").iterdir()} == {
        "result.json",
        "baseline.json",
        "acceptance.csv",
        "acceptance.png",
    }
    off = EvaluationResult.load(tmp_path / "off")
    assert off.acceptance_length > EvaluationResult.load(tmp_path / "off" / "baseline.json").acceptance_length
    assert (
        main(
            [
                "evaluate",
                "compare",
                str(tmp_path / "off"),
                str(tmp_path / "gen" / "result.json"),
                "--output",
                str(tmp_path / "cmp"),
            ]
        )
        == 0
    )
    assert "offline" in capsys.readouterr().out and (tmp_path / "cmp" / "compare.png").is_file()
    # User errors exit 2 with a message, no traceback.
    assert main(["evaluate", "offline", *head, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
