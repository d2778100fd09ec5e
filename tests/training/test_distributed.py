"""torchrun with 2 CPU ranks (gloo) gives the same losses as 1 rank with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mtptune.training.config import DataConfig
from mtptune.training.train import run_training

from .conftest import offline_config


def train_losses(save_path: Path) -> list[float]:
    records = [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_accumulation(learnable, tmp_path):
    data = DataConfig(str(learnable.data), 128, 0.8, max_rows=48)
    single = offline_config(learnable, tmp_path / "one", data=data, epochs=1, validate_at_start=False)
    run_training(replace(single, optim=replace(single.optim, grad_accum=2)))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mtptune.cli.main", "train"]
    cmd += ["--verifier-name-or-path", str(learnable.verifier), "--data-path", str(learnable.data)]
    cmd += ["--save-path", str(tmp_path / "two"), "--max-rows", "48", "--total-seq-len", "128"]
    cmd += ["--train-data-ratio", "0.8", "--epochs", "1", "--lr", "3e-3"]
    cmd += ["--warmup-steps", "2", "--on-missing", "raise", "--no-progress", "--no-initial-val", "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) > 3
    assert two == pytest.approx(one, rel=1e-5)
    assert not (tmp_path / "two" / "0" / "optimizer_state_dict.pt.rank1").exists()
