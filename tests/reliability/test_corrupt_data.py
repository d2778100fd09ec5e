"""Corrupt hidden-state files (truncated, garbage, NaN/Inf, all zeros, another row's token ids): detected, never
trained on, counted by reason in the run summary; regenerated when a server is available (hybrid cache), or
failing loudly with --on-missing raise."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtptune.cli.main import main

from .conftest import records, train_args

# row -> how it is broken; all are training rows (the first 18 of 24 rows train)
CORRUPTIONS = {0: "truncated", 1: "garbage", 2: "nan", 3: "inf", 4: "zeros", 5: "other_row"}
REASONS = {"unreadable": 2, "non_finite": 2, "all_zero": 1, "token_mismatch": 1}


def corrupt_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    for row, how in CORRUPTIONS.items():
        path = target / f"hs_{row}.safetensors"
        if how == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif how == "garbage":
            path.write_bytes(b"\x00not a safetensors file\xff" * 10)
        elif how == "other_row":
            shutil.copy(target / "hs_17.safetensors", path)
        else:
            tensors = load_file(path)
            hidden = tensors["hidden_states"]
            if how == "zeros":
                hidden.zero_()
            else:
                hidden[len(hidden) // 2, 0, 3] = float("nan") if how == "nan" else float("inf")
            save_file({"hidden_states": hidden, "token_ids": tensors["token_ids"]}, path)
    return target


def test_corrupt_files_are_skipped_and_counted_by_reason(corpus, tmp_path, capsys):
    folder = corrupt_copy(corpus.data / "hidden_states", tmp_path / "hs")
    save = tmp_path / "ckpt"
    # 6 of 24 rows are bad, more than the default --max-failed-fraction 0.1 (test_trainer_fail_fast.py): allowed here.
    args = train_args(corpus, save, "--on-missing", "skip", "--hidden-states-path", str(folder), "--epochs", "1",
                      "--max-failed-fraction", "0.5")  # fmt: skip
    assert main(args) == 0
    [summary] = records(save, "summary")
    assert summary["invalid_reasons"] == REASONS and summary["invalid"] == 6
    assert summary["train_row_uses_total"] == 18 - 6 and summary["loaded"] == 18 - 6 + 6  # + the 6 val rows
    out = capsys.readouterr().out
    assert "6 invalid (all_zero 1, non_finite 2, token_mismatch 1, unreadable 2)" in out


def test_corrupt_file_with_on_missing_raise_fails_loudly_naming_the_file(corpus, tmp_path, capsys):
    folder = corrupt_copy(corpus.data / "hidden_states", tmp_path / "hs")
    args = train_args(corpus, tmp_path / "ckpt", "--on-missing", "raise", "--hidden-states-path", str(folder))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "hs_" in err and "--on-missing raise" in err and "Traceback" not in err


def test_corrupt_cached_files_are_regenerated_by_the_server(corpus, online_server, tmp_path, capsys):
    base, _storage = online_server
    folder = corrupt_copy(corpus.data / "hidden_states", tmp_path / "hs")
    save = tmp_path / "ckpt"
    args = train_args(
        corpus, save, "--vllm-endpoint", base + "/v1", "--on-generate", "cache", "--hidden-states-path", str(folder),
        "--epochs", "1", "--max-retries", "0",
    )  # fmt: skip
    assert main(args) == 0
    [summary] = records(save, "summary")
    server = summary["server"]
    assert server["invalid"] == REASONS and server["generated"] == 6 and server["failed"] == 0
    assert summary["train_row_uses_min"] == summary["train_row_uses_max"] == 1  # nothing lost
    for row in CORRUPTIONS:  # the cache now holds good files
        tensors = load_file(folder / f"hs_{row}.safetensors")
        assert torch.isfinite(tensors["hidden_states"]).all()
        assert tensors["token_ids"].tolist() == corpus.rows[row]["input_ids"]
