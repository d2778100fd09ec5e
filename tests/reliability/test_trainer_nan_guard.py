"""The NaN guard (issue 22, item 5): a head with a NaN weight is refused by train and by evaluate offline (which
reported acceptance 0.000); a run that diverges stops at the step where it did, exit 2, without writing a
checkpoint from that state, and keeps the last good checkpoint and checkpoint_best as they were."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtptune.checkpoint.head_checkpoint import load_head_checkpoint, save_head_checkpoint
from mtptune.cli.main import main
from mtptune.training.checkpointing import complete_checkpoints

from .conftest import records, train_args

OFFLINE = ("--on-missing", "raise")


@pytest.fixture(scope="module")
def nan_head(corpus, tmp_path_factory) -> Path:
    """The verifier's native head, converted, with one NaN in mtp.fc.weight (as a diverged run leaves it)."""
    out = tmp_path_factory.mktemp("nanhead")
    assert main(["convert", str(corpus.verifier), "--output-path", str(out / "head")]) == 0
    config, state = load_head_checkpoint(out / "head")
    state["fc.weight"][0, 0] = float("nan")
    save_head_checkpoint(out / "nan", config, state)
    return out / "nan"


def test_a_head_with_a_nan_weight_is_refused_by_train_and_evaluate(corpus, nan_head, tmp_path, capsys):
    save = tmp_path / "ckpt"
    assert main(train_args(corpus, save, *OFFLINE, "--epochs", "1", "--from-pretrained", str(nan_head))) == 2
    err = capsys.readouterr().err
    assert f"the starting head ({nan_head}) holds NaN or Inf in 'fc.weight'" in err and "Traceback" not in err, err
    assert complete_checkpoints(save) == [] and not (save / "checkpoint_best").exists()

    args = ["evaluate", "offline", "--head", str(nan_head), "--verifier", str(corpus.verifier)]
    assert main([*args, "--data", str(corpus.data), "--max-rows", "2", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "holds NaN or Inf in 'fc.weight'" in err and "0.000" in err and "Traceback" not in err, err


def test_a_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    save = tmp_path / "ckpt"
    assert main(train_args(corpus, save, *OFFLINE, "--epochs", "1")) == 0
    good = {p.name: p.read_bytes() for p in (save / "0").iterdir()}
    best = os.readlink(save / "checkpoint_best")
    last_good_step = max(r["step"] for r in records(save, "train"))
    capsys.readouterr()
    # lr 1e30 (applied by --resume-with-changes) blows the weights up at the first step of epoch 1.
    diverge = ("--epochs", "2", "--lr", "1e30", "--scheduler", "constant", "--resume-with-changes")
    assert main(train_args(corpus, save, *OFFLINE, *diverge, "--log-every", "100")) == 2
    err = capsys.readouterr().err
    assert "the head diverged" in err and "Traceback" not in err, err
    bad = [r for r in records(save, "train") if r["step"] > last_good_step]
    first_bad = next(r["step"] for r in bad if r["loss"] is None or r["grad_norm"] is None)  # NaN is written null
    assert f"step {first_bad}: the training loss is" in err, err
    assert f"the last good checkpoint, {save / '0'} (checkpoint_best -> 0), is kept as it was" in err, err
    # Nothing was written from the diverged state: 0/ is byte for byte what it was, and best still points at it.
    assert [p.name for p in complete_checkpoints(save)] == ["0"] and not (save / "interrupted").exists()
    assert {p.name: p.read_bytes() for p in (save / "0").iterdir()} == good
    assert os.readlink(save / "checkpoint_best") == best == "0"
