"""torchrun with 2 CPU ranks (gloo) gives the same losses as 1 rank with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mtptune.training.config import DataConfig, HiddenStatesConfig
from mtptune.training.train import run_training

from .conftest import offline_config


def records(save_path: Path) -> list[dict]:
    return [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]


def train_losses(save_path: Path) -> list[float]:
    return [r["loss"] for r in records(save_path) if r["split"] == "train"]


def torchrun_train(learnable, save: Path, *extra: str) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mtptune.cli.main", "train"]
    cmd += ["--verifier-name-or-path", str(learnable.verifier), "--data-path", str(learnable.data)]
    cmd += ["--save-path", str(save), "--max-rows", "48", "--total-seq-len", "128"]
    cmd += ["--train-data-ratio", "0.8", "--epochs", "1", "--lr", "3e-3"]
    cmd += ["--warmup-steps", "2", "--no-progress", "--no-initial-val", "--log-every", "1", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_accumulation(learnable, tmp_path):
    data = DataConfig(str(learnable.data), 128, 0.8, max_rows=48)
    single = offline_config(learnable, tmp_path / "one", data=data, epochs=1, validate_at_start=False)
    run_training(replace(single, optim=replace(single.optim, grad_accum=2)))
    torchrun_train(learnable, tmp_path / "two", "--on-missing", "raise")
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) > 3
    assert two == pytest.approx(one, rel=1e-5)
    assert not (tmp_path / "two" / "0" / "optimizer_state_dict.pt.rank1").exists()


@pytest.mark.slow
def test_two_colocated_ranks_each_forward_their_own_rows_and_match_one_rank(learnable, tmp_path):
    """--colocated under torchrun: each rank runs its own verifier replica on its own shard of the rows (the
    2-GPU headline job); the losses are one process's with the same global batch, up to the rounding of the
    differently batched verifier forwards, and no hidden-state file is written anywhere."""
    data = DataConfig(str(learnable.data), 128, 0.8, max_rows=48)
    colocated = HiddenStatesConfig(colocated=True, forward_tokens=256)
    single = offline_config(learnable, tmp_path / "one", data=data, epochs=1, validate_at_start=False)
    run_training(replace(single, hidden_states=colocated, optim=replace(single.optim, grad_accum=2)))
    before = sorted((learnable.data / "hidden_states").iterdir())
    torchrun_train(learnable, tmp_path / "two", "--colocated", "--verifier-forward-tokens", "256")
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) > 3
    assert two == pytest.approx(one, rel=1e-4)
    summary = next(r for r in records(tmp_path / "two") if r["split"] == "summary")
    per_rank = summary["colocated"]["rows"]
    assert 0 < per_rank < 48, f"rank 0 forwarded {per_rank} rows: not a shard of the 48"
    assert sorted((learnable.data / "hidden_states").iterdir()) == before
    assert not list((tmp_path / "two").rglob("*.safetensors.tmp*"))
