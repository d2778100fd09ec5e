"""Errors that every row would hit stop the run at the first row, with exit 2 and a message naming the cause and
the fix (issue 22, item 1): a server for another verifier, data tokenized for another vocabulary, a server storage
folder the trainer may not read. Too many failed rows stop it too (--max-failed-fraction). None of them writes a
checkpoint when nothing was trained, and none leaves a hidden-state file behind that the trainer may delete."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mtptune.cli.main import main
from mtptune.testing.learnable import write_hidden_state_files, write_prepared_rows
from mtptune.testing.server_process import server_process
from mtptune.testing.tiny import TinySpec, write_tiny_verifier
from mtptune.training.checkpointing import complete_checkpoints

from .conftest import CHILD_ENV, records, train_args
from .test_corrupt_data import corrupt_copy


def online_args(corpus, save: Path, base: str, *extra: str) -> list[str]:
    """Every row from the server (an empty cache), two requests in flight."""
    return train_args(
        corpus, save, "--vllm-endpoint", base + "/v1", "--hidden-states-path", str(save.parent / "cache"),
        "--concurrency", "2", "--prefetch", "2", "--epochs", "2", *extra,
    )  # fmt: skip


def server_counter(base: str, line_start: str) -> int:
    """The value of a /metrics line of the built-in server (0 when absent)."""
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def assert_nothing_saved(save: Path) -> None:
    assert complete_checkpoints(save) == [] and not (save / "checkpoint_best").exists()
    assert records(save, "summary") == []  # the run did not "finish"


def files_in(*folders: Path) -> list[str]:
    return [p.name for d in folders if d.exists() for p in d.iterdir()]


def test_server_of_another_verifier_stops_at_the_first_row(corpus, tmp_path, capsys):
    """The server runs a verifier with hidden size 96 under the trainer's model name (the probe of issue 22): every
    file is refused on its shape. Before: 4 attempts per row, all rows skipped, exit 0 and a checkpoint_best."""
    other = write_tiny_verifier(tmp_path / "other", TinySpec(hidden_size=96))
    storage, save = tmp_path / "hs", tmp_path / "ckpt"
    with server_process(other, storage, "--served-model-name", str(corpus.verifier)) as server:
        started = time.monotonic()
        assert main(online_args(corpus, save, server.base)) == 2
        elapsed = time.monotonic() - started
        written = server_counter(server.base, "mtptune_hidden_state_files_total")
    err = capsys.readouterr().err
    assert "do not fit this run" in err and "96" in err and "64" in err, err
    assert "the same --target-layer-ids" in err and "Traceback" not in err
    assert elapsed < 30, elapsed
    # The rows in flight and prefetched (a few), each asked once; before: 4 attempts for each of the 24 rows.
    assert written <= 8, f"{written} files: rows were retried or the run went on"
    assert_nothing_saved(save)
    assert files_in(storage, tmp_path / "cache") == []  # every file it was sent, deleted


def test_server_capturing_other_layers_stops_at_the_first_row(corpus, tmp_path, capsys):
    """Same layer count, other layers (server `--target-layer-ids 2`, trainer `3`): every file passes the shape
    check and declares a capture this run did not ask for (`layer_mismatch`), which no later row changes."""
    storage, save = tmp_path / "hs", tmp_path / "ckpt"
    with server_process(corpus.verifier, storage, "--target-layer-ids", "2") as server:
        assert main(online_args(corpus, save, server.base, "--target-layer-ids", "3")) == 2
    err = capsys.readouterr().err
    assert "do not fit this run" in err and "layers [2, 4]" in err and "layers [3, 4]" in err, err
    assert_nothing_saved(save)
    assert files_in(storage, tmp_path / "cache") == []


def test_offline_files_of_another_verifier_stop_at_the_first_row(corpus, tmp_path, capsys):
    """The same with pre-written files (`--on-missing skip`, which used to count and skip every row)."""
    other = write_tiny_verifier(tmp_path / "other", TinySpec(hidden_size=96))
    folder = write_hidden_state_files(other, corpus.rows, tmp_path / "hs")
    save = tmp_path / "ckpt"
    args = train_args(corpus, save, "--on-missing", "skip", "--hidden-states-path", str(folder), "--epochs", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "do not fit this run" in err and "H=64" in err and "96" in err and "Traceback" not in err, err
    assert_nothing_saved(save)


def test_data_of_another_vocabulary_stops_at_the_first_row(corpus, online_server, tmp_path, capsys):
    """Token ids beyond the verifier's vocabulary: the server answers 400, which no retry or later row changes."""
    base, storage = online_server
    shifted = [{"input_ids": [t + 1000 for t in r["input_ids"]], "loss_mask": r["loss_mask"]} for r in corpus.rows]
    data = write_prepared_rows(shifted, tmp_path / "data")
    save = tmp_path / "ckpt"
    refused_before = server_counter(base, 'mtptune_requests_total{endpoint="/v1/completions",status="400"}')
    args = online_args(corpus, save, base)
    args[args.index("--data-path") + 1] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "out of vocabulary" in err and "tokenized for another model" in err and "mtptune prepare" in err, err
    assert "Traceback" not in err
    refused = server_counter(base, 'mtptune_requests_total{endpoint="/v1/completions",status="400"}')
    assert refused - refused_before <= 8  # the first rows in flight, not all 24
    assert_nothing_saved(save)
    assert files_in(storage) == []


@pytest.fixture(scope="module")
def user_namespaces():
    done = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"no unprivileged user namespaces here: {done.stderr.decode().strip()}")


@pytest.mark.parametrize(
    ("mode", "said"),
    [(0o000, "may not read the hidden-state file"), (0o555, "may not remove the hidden-state file")],
    ids=["unreadable", "read-only"],
)
def test_storage_folder_the_trainer_may_not_use_stops_at_the_first_row(corpus, user_namespaces, tmp_path, mode, said):
    """The server may write into its storage folder and the trainer may not read it (mode 000), or may read but not
    remove what is in it (mode 555: every file would stay and fill the disk), as when the server runs as another
    user. The server gets CAP_DAC_OVERRIDE over our files in a user namespace where we are root; the trainer runs in
    an (unmapped) user namespace where nobody, not even root, has it."""
    storage, save = tmp_path / "hs", tmp_path / "ckpt"
    storage.mkdir()
    storage.chmod(mode)
    try:
        with server_process(corpus.verifier, storage, prefix=["unshare", "--user", "--map-root-user"]) as server:
            cmd = ["unshare", "--user", sys.executable, "-m", "mtptune.cli.main"]
            started = time.monotonic()
            done = subprocess.run(
                [*cmd, *online_args(corpus, save, server.base)], env=CHILD_ENV, capture_output=True, text=True
            )
            elapsed = time.monotonic() - started
        storage.chmod(0o755)
        left = sorted(p.name for p in storage.iterdir() if not p.name.endswith(".lock"))
    finally:
        storage.chmod(0o755)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert said in out and "Permission denied" in out and str(storage) in out and "umask 002" in out, out[-3000:]
    assert "Traceback" not in out and elapsed < 60
    assert_nothing_saved(save)
    # The trainer may not delete them: it stopped at the first (a few requests in flight) and says how many are left.
    assert 1 <= len(left) <= 8, left
    reported = re.search(r"(\d+) hidden-state files could not be deleted", out)
    assert reported and int(reported.group(1)) >= len(left), out[-3000:]


def test_too_many_failed_rows_stop_the_run(corpus, tmp_path, capsys):
    """6 of the 24 rows have corrupt files (`test_corrupt_data.py`): 25 % of the rows, more than the default
    --max-failed-fraction 0.1. Over a 10-row window the run stops mid-epoch; over the default 200-row window (more
    rows than the run has) at the end of the first epoch, before any checkpoint of it is written."""
    folder = corrupt_copy(corpus.data / "hidden_states", tmp_path / "hs")
    flags = ("--on-missing", "skip", "--hidden-states-path", str(folder), "--epochs", "2")
    save = tmp_path / "window"
    assert main(train_args(corpus, save, *flags, "--failed-fraction-window", "10")) == 2
    err = capsys.readouterr().err
    assert re.search(r"\d+ of the last 10 rows had no usable hidden states, more than --max-failed-fraction 0.1", err)
    assert "--max-failed-fraction 1" in err and "Traceback" not in err, err
    assert not (save / "checkpoint_best").exists() and not (save / "0").exists()

    save = tmp_path / "epoch"
    assert main(train_args(corpus, save, *flags)) == 2
    err = capsys.readouterr().err
    assert "6 of the last 18 rows had no usable hidden states" in err, err  # the training rows, before validation
    assert "non_finite 2" in err and "unreadable 2" in err
    assert not (save / "checkpoint_best").exists() and not (save / "0").exists()
    # The steps it trained are kept: interrupted/ resumes them once the files are fixed.
    assert "Saved a resumable checkpoint" in err and (save / "interrupted" / "config.json").is_file()
