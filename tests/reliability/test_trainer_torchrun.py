"""Under torchrun, a hidden-state server lost on one rank only (issue 22, the known gap): every rank stops after
the same step, one resumable `interrupted/` is written (by rank 0), each rank exits with a message, and the same
command resumes once the server is back. Before, the rank that lost its server saved and left while the others
went on into the next step's gradient all-reduce: a hang (or a gloo error) and no agreed checkpoint.

Two real CPU ranks (gloo) share one real server; rank 0's rows of the first epoch are all in the hybrid cache, so
only rank 1 needs the server, and killing it loses the server on rank 1 alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtptune.data.rows import PreparedRows
from mtptune.serving.server_config import free_port
from mtptune.training.batching import pack_rows, plan_epoch, split_train_val

from .conftest import records, start_server, stop, train_args, wait_for_step

SEQ_LEN, RATIO = 48, 0.75


def rank_rows(data: Path, rank: int, world_size: int) -> set[int]:
    """The rows `rank` trains in epoch 0 (the trainer's own planning: seed 0, no accumulation)."""
    rows = PreparedRows(data, SEQ_LEN)
    train_ids, _ = split_train_val(len(rows), RATIO)
    plan = plan_epoch(pack_rows(train_ids, rows.lengths, SEQ_LEN, seed=0, epoch=0), rank, world_size, 1)
    return {i for step in plan.steps for micro in step for i in micro}


def torchrun(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        return subprocess.Popen([*cmd, "-m", "mtptune.cli.main", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
def test_a_server_lost_on_one_rank_stops_every_rank_after_the_same_step(corpus, tmp_path):
    cache, storage, save, port = tmp_path / "cache", tmp_path / "hs", tmp_path / "ckpt", free_port()
    cache.mkdir()
    for row in rank_rows(corpus.data, 0, 2):
        shutil.copy(corpus.data / "hidden_states" / f"hs_{row}.safetensors", cache)
    args = train_args(
        corpus, save, "--vllm-endpoint", f"http://127.0.0.1:{port}/v1", "--on-generate", "cache",
        "--hidden-states-path", str(cache), "--total-seq-len", str(SEQ_LEN), "--epochs", "1",
        "--concurrency", "1", "--prefetch", "1", "--server-wait-timeout", "3", "--max-retries", "1",
    )  # fmt: skip
    server = start_server(corpus.verifier, storage, port)
    log = tmp_path / "torchrun.log"
    ranks = torchrun(args, log)
    try:
        wait_for_step(save, 2, ranks, timeout=180)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert ranks.wait(timeout=180) != 0
    finally:
        if ranks.poll() is None:
            ranks.kill()
            ranks.wait()
        stop(server)
    text = log.read_text()
    state = json.loads((save / "interrupted" / "training_state.json").read_text())
    step = state["global_step"]
    # Rank 1 says why; rank 0 says it stopped with it; both after the same step, one checkpoint at that step.
    assert "unavailable" in text and "start the server again and rerun the same command" in text, text[-4000:]
    assert "rank 0: stopped because the hidden-state source of rank 1 failed" in text, text[-4000:]
    saved_at = re.findall(r"Saved a resumable checkpoint at global step (\d+)", text)
    assert saved_at == [str(step)] * 2, text[-4000:]
    assert max(r["step"] for r in records(save, "train")) == step >= 2

    server = start_server(corpus.verifier, storage, port)
    try:
        resumed = torchrun(args, tmp_path / "resume.log")
        assert resumed.wait(timeout=240) == 0, (tmp_path / "resume.log").read_text()[-4000:]
    finally:
        stop(server)
    steps = [r["step"] for r in records(save, "train")]
    assert steps[steps.index(step) + 1 :] == list(range(step + 1, steps[-1] + 1))  # resumed where all stopped
    assert records(save, "summary")[-1]["failed"] == 0


def rank_pid(torchrun_pid: int, local_rank: int, timeout: float = 60.0) -> int:
    """The pid of torchrun's worker with LOCAL_RANK `local_rank` (a child of its agent process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int(re.search(r"^PPid:\s+(\d+)", (entry / "status").read_text(), re.M).group(1))
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, AttributeError):
                continue
            if ppid == torchrun_pid and f"LOCAL_RANK={local_rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no torchrun worker with LOCAL_RANK={local_rank} under pid {torchrun_pid}")


@pytest.mark.slow
def test_a_rank_killed_mid_run_ends_every_rank_and_the_same_command_resumes(corpus, tmp_path):
    """A rank that dies (the OOM killer, a bug that exits) must not leave the others waiting in the next collective
    until the process group's timeout (30 min): the job ends, no folder looks complete that is not, and the same
    command resumes from the last complete checkpoint."""
    save = tmp_path / "ckpt"
    args = train_args(corpus, save, "--on-missing", "raise", "--epochs", "12", "--total-seq-len", str(SEQ_LEN))
    log = tmp_path / "torchrun.log"
    ranks = torchrun(args, log)
    try:
        deadline = time.monotonic() + 180
        while not (save / "0" / "config.json").exists():  # epoch 0's checkpoint, then a kill in epoch 1
            assert ranks.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        os.kill(rank_pid(ranks.pid, 1), signal.SIGKILL)
        code = ranks.wait(timeout=120)  # before: rank 0 could wait in gloo's all-reduce for the 30-minute timeout
    finally:
        if ranks.poll() is None:
            ranks.kill()
            ranks.wait()
    text = log.read_text()
    assert code != 0, text[-3000:]
    # Rank 0 says what happened in one line (no traceback of its own); torchrun names the killed rank.
    assert "mtptune train: rank 0: another rank stopped mid-step" in text, text[-3000:]
    assert "Signal 9 (SIGKILL) received by PID" in text, text[-3000:]
    stopped_at = max(r["step"] for r in records(save, "train"))
    complete = [p for p in save.iterdir() if p.is_dir() and (p / "config.json").exists()]
    assert complete, f"no complete checkpoint after {stopped_at} steps: {sorted(p.name for p in save.iterdir())}"
    for folder in complete:  # every folder that looks complete is: its training state and weights read back
        json.loads((folder / "training_state.json").read_text())
        assert (folder / "model.safetensors").stat().st_size > 0

    again = torchrun(args, tmp_path / "resume.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    resumed = (tmp_path / "resume.log").read_text()
    assert "resuming from" in resumed, resumed[-3000:]
    assert (save / "checkpoint_best").exists()
    assert max(r["step"] for r in records(save, "train")) > stopped_at
