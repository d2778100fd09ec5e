"""Resume with changed flags (issue 22, item 4): refused with the differences listed; with --resume-with-changes
the new values really apply (a new --lr used to be ignored: the checkpoint's scheduler kept the old one) and are
recorded; a new K is refused even then (the folder would hold checkpoints of both K)."""

from __future__ import annotations

import json

import pytest
import yaml

from mtptune.cli.main import main
from mtptune.training.checkpointing import complete_checkpoints

from .conftest import records, train_args

OFFLINE = ("--on-missing", "raise")


@pytest.fixture
def one_epoch(corpus, tmp_path):
    """A finished one-epoch run (lr 3e-3, cosine): the checkpoint the tests resume."""
    save = tmp_path / "ckpt"
    assert main(train_args(corpus, save, *OFFLINE, "--epochs", "1")) == 0
    return save


def test_changed_flags_are_refused_with_the_differences_listed(corpus, one_epoch, capsys):
    save = one_epoch
    run_yaml = (save / "run.yaml").read_text()
    changed = ("--epochs", "2", "--lr", "1e-3", "--scheduler", "constant", "--total-seq-len", "96")
    assert main(train_args(corpus, save, *OFFLINE, *changed)) == 2
    err = capsys.readouterr().err
    for line in ("--lr: 0.003 -> 0.001", "--epochs: 1 -> 2", "--scheduler: 'cosine' -> 'constant'",
                 "--total-seq-len: 64 -> 96"):  # fmt: skip
        assert line in err, err
    assert "--resume-with-changes" in err and "Traceback" not in err
    assert "--grad-clip" not in err  # only what differs
    assert (save / "run.yaml").read_text() == run_yaml and [p.name for p in complete_checkpoints(save)] == ["0"]

    # A new K is refused even with --resume-with-changes: checkpoint_best would compare tau_sim across K.
    assert main(train_args(corpus, save, *OFFLINE, "--epochs", "1", "--num-speculative-steps", "2",
                           "--resume-with-changes")) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "trained for K=3" in err and "K=2" in err and "--from-pretrained" in err, err
    # ... and so is --no-resume into the same folder, which would leave checkpoints of both K there.
    assert main(train_args(corpus, save, *OFFLINE, "--epochs", "1", "--num-speculative-steps", "2",
                           "--no-resume")) == 2  # fmt: skip
    assert "holds a K=3 checkpoint" in capsys.readouterr().err
    assert (save / "run.yaml").read_text() == run_yaml and [p.name for p in complete_checkpoints(save)] == ["0"]


def test_resume_with_changes_applies_and_records_them(corpus, one_epoch):
    save = one_epoch
    resumed_at = json.loads((save / "0" / "training_state.json").read_text())["global_step"]
    changed = ("--epochs", "2", "--lr", "1e-3", "--scheduler", "constant")
    assert main(train_args(corpus, save, *OFFLINE, *changed, "--resume-with-changes")) == 0
    # The new lr with the new (constant) schedule from the first resumed step on; before, the checkpoint's
    # scheduler kept lr 3e-3 on its cosine while run.yaml said 1e-3.
    later = [r for r in records(save, "train") if r["step"] > resumed_at]
    assert later and all(r["lr"] == pytest.approx(1e-3, rel=1e-12) for r in later)
    [resume] = records(save, "resume")
    assert resume["step"] == resumed_at and resume["from"] == str(save / "0")
    assert {c["flag"]: (c["checkpoint"], c["now"]) for c in resume["resumed_with_changes"]} == {
        "--epochs": (1, 2),
        "--lr": (0.003, 0.001),
        "--scheduler": ("cosine", "constant"),
    }
    run = yaml.safe_load((save / "run.yaml").read_text())
    assert run["optim"]["lr"] == 0.001 and len(run["resumed_with_changes"]) == 3
    # The new checkpoint records the new flags: resuming it again with them needs no --resume-with-changes.
    assert json.loads((save / "1" / "run_config.json").read_text())["config"]["optim"]["lr"] == 0.001
    assert main(train_args(corpus, save, *OFFLINE, *changed)) == 0
