"""The trainer dies (SIGKILL) or is interrupted (SIGINT) at a seeded random step: the same command resumes and
the losses that follow and the final weights are bit-identical to an uninterrupted run. Checkpoint writes are
atomic: a crash while saving never leaves a folder that looks complete, and checkpoint_best stays complete."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtptune.cli.main import main
from mtptune.training.checkpointing import find_resume_checkpoint

from .conftest import CHILD_ENV, records, spawn, train_args, wait_for_step

# Mid-epoch checkpoints every quarter epoch, so a kill loses at most a few steps (which are redone).
FLAGS = ("--on-missing", "raise", "--epochs", "2", "--checkpoint-freq", "0.25")


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("straight") / "ckpt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identity holds at a fixed thread count: the children run with one thread
    try:
        assert main(train_args(corpus, save, *FLAGS)) == 0
    finally:
        torch.set_num_threads(threads)
    return save


def losses(save: Path) -> dict[int, float]:
    """Loss per global step; a step run twice (before a kill and after the resume) must agree with itself."""
    out: dict[int, float] = {}
    for r in records(save, "train"):
        assert out.setdefault(r["step"], r["loss"]) == r["loss"], f"step {r['step']} differs between runs"
    return out


def assert_identical(save: Path, straight: Path) -> None:
    assert losses(save) == losses(straight)  # exact float equality, every step
    a = torch.load(straight / "1" / "master_weights.pt", weights_only=True)
    b = torch.load(save / "1" / "master_weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_killed_trainer_resumes_bit_identically(corpus, straight, tmp_path, sig):
    total = max(losses(straight))
    kill_at = random.Random(f"mtptune-{sig.name}").randint(3, total - 3)
    save = tmp_path / "ckpt"
    proc = spawn(train_args(corpus, save, *FLAGS), tmp_path / "train.log")
    try:
        wait_for_step(save, kill_at, proc)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "train.log").read_text()
    if sig == signal.SIGINT:  # finish the step, save interrupted/, exit 130 with a hint
        assert rc == 130 and "rerun the same command to resume" in log, log[-2000:]
        assert (save / "interrupted" / "config.json").is_file()
    else:
        assert rc == -signal.SIGKILL
    resume_from = find_resume_checkpoint(save)
    assert resume_from is not None and (resume_from / "model.safetensors").is_file()
    assert main(train_args(corpus, save, *FLAGS)) == 0
    assert_identical(save, straight)


SAVE_SCRIPT = r"""
import sys, time, shutil, torch
from pathlib import Path
from mtptune.checkpoint import files, head_checkpoint
from mtptune.training import checkpointing as ckpt
from mtptune.checkpoint.head_checkpoint import load_head_checkpoint

source, save, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
config, state = load_head_checkpoint(source)
marker = save / "SLOW"

def slowly(real):
    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        marker.touch()
        time.sleep(60)  # the parent kills us here
        return out
    return wrapped

if mode == "write":  # killed after the first file of a new folder
    torch.save = slowly(torch.save)
    target = save / "step999"
else:  # "overwrite": killed while the old copy of an existing folder is being deleted
    def half_delete(path, ignore_errors=False):
        next(Path(path).rglob("model.safetensors")).unlink()
        marker.touch()
        time.sleep(60)
    files.shutil.rmtree = half_delete
    target = save / "0"
extra = {"master_weights.pt": state, "training_state.json": {"epoch": 0, "local_step": 0, "global_step": 0}}
head_checkpoint.save_head_checkpoint(target, config, state, extra, overwrite=True)
"""


@pytest.mark.parametrize("mode", ["write", "overwrite"])
def test_crash_while_saving_never_leaves_a_complete_looking_folder(straight, tmp_path, mode):
    import shutil

    save = tmp_path / "ckpt"
    shutil.copytree(straight, save, symlinks=True)
    for name in ("interrupted",):
        shutil.rmtree(save / name, ignore_errors=True)
    before = find_resume_checkpoint(save)
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_SCRIPT, str(save / "1"), str(save), mode], env=CHILD_ENV, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not (save / "SLOW").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    for folder in [p for p in save.iterdir() if p.is_dir() and not p.name.startswith(".")]:
        # Every visible folder with config.json is a whole checkpoint that loads.
        if (folder / "config.json").exists():
            assert {"model.safetensors", "master_weights.pt", "training_state.json"} <= {
                p.name for p in folder.iterdir()
            }
    assert not (save / "step999").exists()
    assert find_resume_checkpoint(save) == before  # the crash did not change what a resume picks
    best = save / "checkpoint_best"
    assert (best / "config.json").is_file() and (best / "model.safetensors").is_file()
