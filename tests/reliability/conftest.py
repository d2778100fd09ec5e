"""Reliability suite: a tiny real verifier, prepared rows with offline hidden states, and helpers to run the real
`mtptune serve` / `mtptune train` processes, kill them and read what they left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mtptune.testing.learnable import LearnableSpec, pattern_rows, write_hidden_state_files, write_prepared_rows
from mtptune.testing.server_process import running_server

NUM_ROWS = 24
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@dataclass(frozen=True)
class Corpus:
    verifier: Path
    data: Path  # prepared rows; offline hidden states in data/hidden_states
    rows: list[dict]


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs with one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def corpus(tiny_verifier, tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("reliability")
    rows = pattern_rows(LearnableSpec(), NUM_ROWS, seed=3)
    data = write_prepared_rows(rows, root / "data")
    write_hidden_state_files(tiny_verifier, rows, data / "hidden_states")
    return Corpus(Path(tiny_verifier), data, rows)


def train_args(corpus: Corpus, save: Path, *extra: str) -> list[str]:
    """A small `mtptune train` command line; `extra` overrides / adds flags."""
    return [
        "train", "--verifier-name-or-path", str(corpus.verifier), "--data-path", str(corpus.data),
        "--save-path", str(save), "--total-seq-len", "64", "--train-data-ratio", "0.75", "--lr", "3e-3",
        "--no-progress", "--no-initial-val", "--log-every", "1", *extra,
    ]  # fmt: skip


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m mtptune.cli.main ARGS` as a real child process, output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mtptune.cli.main", *args], stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV
        )


def records(save: Path, split: str) -> list[dict]:
    path = save / "metrics.jsonl"
    if not path.exists():
        return []
    # The trainer may be writing right now: only newline-terminated lines are complete records.
    complete = path.read_text().split("\n")[:-1]
    return [r for line in complete if line and (r := json.loads(line))["split"] == split]


def wait_for_step(save: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll metrics.jsonl until a train record with global step >= `step` appears."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in records(save, "train")):
        assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"no train step {step} within {timeout} s"
        time.sleep(0.02)


def start_server(model: Path, storage: Path, port: int, *extra: str) -> subprocess.Popen:
    """The real built-in server on a fixed port (so it can be restarted on the same one); waits for /health."""
    log = storage.parent / f"server-{port}-{time.monotonic_ns()}.log"
    args = ["serve", str(model), "--engine", "builtin", "--port", str(port), "--hidden-states-path", str(storage)]
    proc = spawn([*args, *extra], log)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def online_server(corpus, tmp_path_factory):
    """One real built-in server for the tests that only need it alive: (base URL, its storage folder)."""
    storage = tmp_path_factory.mktemp("online") / "hs"
    with running_server(corpus.verifier, storage) as base:
        yield base, storage
