"""Two trainers on one --save-path (issue 22, item 3): the second exits 2 naming the first (pid, host) and writes
nothing there; the lock of a trainer that was killed is taken over by the next one."""

from __future__ import annotations

import json
import logging
import signal
import socket

from mtptune.cli.main import main

from .conftest import records, spawn, train_args, wait_for_step

OFFLINE = ("--on-missing", "raise")


def test_second_trainer_exits_2_naming_the_first_and_a_dead_ones_lock_is_taken_over(corpus, tmp_path, capsys, caplog):
    save = tmp_path / "ckpt"
    first = spawn(train_args(corpus, save, *OFFLINE, "--epochs", "500"), tmp_path / "first.log")
    try:
        wait_for_step(save, 2, first)
        run_yaml = (save / "run.yaml").read_text()
        metrics = (save / "metrics.jsonl").stat().st_size
        assert main(train_args(corpus, save, *OFFLINE, "--epochs", "1", "--lr", "1e-3")) == 2
        err = capsys.readouterr().err
        assert f"--save-path {save} is in use by another trainer (pid {first.pid} on host {socket.gethostname()}" in err
        assert "Traceback" not in err
        assert (save / "run.yaml").read_text() == run_yaml  # the second wrote nothing there
        assert first.poll() is None  # and the first trains on, alone
        wait_for_step(save, max(r["step"] for r in records(save, "train")) + 1, first)
        assert (save / "metrics.jsonl").stat().st_size > metrics
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # A killed trainer leaves its lock file; the kernel dropped its flock, so the next trainer takes it over.
    assert json.loads((save / ".train.lock").read_text())["pid"] == first.pid
    with caplog.at_level(logging.WARNING):
        assert main(train_args(corpus, save, *OFFLINE, "--epochs", "1", "--no-resume")) == 0
    assert f"taking over the lock of a trainer that is no longer running (pid {first.pid}" in caplog.text
    assert not (save / ".train.lock").exists()  # released with the run
