"""The hidden-state server dies mid-training (SIGKILL): the trainer waits for it, loses no sample, or stops
cleanly with a resumable checkpoint and the endpoint in the message."""

from __future__ import annotations

import json
import signal
import time

from mtptune.serving.server_config import free_port

from .conftest import records, spawn, start_server, stop, train_args, wait_for_step

EPOCHS = 2


def online_args(corpus, save, port, *extra):
    # An empty cache folder: every row must come from the server (the corpus's offline files would be cache hits).
    return train_args(
        corpus, save, "--vllm-endpoint", f"http://127.0.0.1:{port}/v1", "--epochs", str(EPOCHS),
        "--hidden-states-path", str(save.parent / "cache"),
        "--total-seq-len", "48", "--concurrency", "2", "--prefetch", "2", *extra,
    )  # fmt: skip


def test_server_killed_and_restarted_mid_training_loses_no_sample(corpus, tmp_path):
    storage, save, port = tmp_path / "hs", tmp_path / "ckpt", free_port()
    server = start_server(corpus.verifier, storage, port)
    trainer = spawn(online_args(corpus, save, port, "--server-wait-timeout", "90"), tmp_path / "train.log")
    try:
        wait_for_step(save, 2, trainer)
        server.send_signal(signal.SIGKILL)
        server.wait()
        time.sleep(1.0)  # the trainer now meets a refused connection
        server = start_server(corpus.verifier, storage, port)
        assert trainer.wait(timeout=180) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        stop(trainer)
        stop(server)
    [summary] = records(save, "summary")
    # Every training row was used exactly once per epoch; nothing skipped, something retried.
    assert summary["train_row_uses_min"] == summary["train_row_uses_max"] == EPOCHS
    assert summary["train_row_uses_total"] == summary["train_rows"] * EPOCHS
    assert (summary["failed"], summary["invalid"], summary["missing"]) == (0, 0, 0)
    assert summary["server"]["retried"] > 0 and summary["server"]["failed"] == 0
    assert "retries" in (tmp_path / "train.log").read_text()
    # --on-generate delete: nothing left in the server's folder or the cache, even after a kill mid-write.
    assert [p.name for d in (storage, tmp_path / "cache") for p in d.iterdir()] == []


def test_server_that_never_returns_stops_the_trainer_with_a_resumable_checkpoint(corpus, tmp_path):
    storage, save, port = tmp_path / "hs", tmp_path / "ckpt", free_port()
    endpoint = f"http://127.0.0.1:{port}/v1"
    args = online_args(corpus, save, port, "--server-wait-timeout", "3", "--max-retries", "1")
    server = start_server(corpus.verifier, storage, port)
    trainer = spawn(args, tmp_path / "train.log")
    try:
        wait_for_step(save, 2, trainer)
        server.send_signal(signal.SIGKILL)
        server.wait()
        started = time.monotonic()
        assert trainer.wait(timeout=60) == 2
        assert time.monotonic() - started < 30  # a clear error, not a hang
    finally:
        stop(trainer)
        stop(server)
    log = (tmp_path / "train.log").read_text()
    assert "Traceback" not in log and endpoint in log and "unavailable" in log and "rerun the same command" in log
    state = json.loads((save / "interrupted" / "training_state.json").read_text())
    assert state["global_step"] >= 2
    # The same command resumes once the server is back and finishes the planned steps.
    server = start_server(corpus.verifier, storage, port)
    try:
        resumed = spawn(args, tmp_path / "resume.log")
        assert resumed.wait(timeout=180) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        stop(server)
    steps = [r["step"] for r in records(save, "train")]
    resumed_steps = steps[steps.index(state["global_step"] + 1, state["global_step"]) :]
    assert resumed_steps == list(range(state["global_step"] + 1, steps[-1] + 1))
    summary = records(save, "summary")[-1]
    assert summary["failed"] == 0 and summary["train_row_uses_max"] <= EPOCHS
