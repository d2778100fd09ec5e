"""`--on-generate cache` into a folder that fills up (the known gap "a full hybrid cache folder"), for real: the
trainer runs in its own user + mount namespace with a 64 KiB tmpfs over `--hidden-states-path`, the server writes
its files on the ordinary disk, and moving them into the cache runs out of space after a few rows.

The run is not harmed by it (every row's states were read before the move): it warns once, naming the folder and
the fixes, stops caching, deletes the server's files as `--on-generate delete` would (none is left behind), counts
the rows it could not cache, and finishes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtptune.testing.server_process import server_process

from .conftest import CHILD_ENV, records, train_args
from .test_server_full_disk import namespaces_work, tmpfs_prefix  # noqa: F401  (the fixture is used by name)


@pytest.mark.slow
@pytest.mark.usefixtures("namespaces_work")
def test_a_full_cache_folder_is_said_once_and_the_run_finishes_without_leaving_files(corpus, tmp_path):
    storage, cache, save = tmp_path / "hs", tmp_path / "cache", tmp_path / "ckpt"
    storage.mkdir()
    cache.mkdir()
    args = train_args(
        corpus, save, "--hidden-states-path", str(cache), "--on-generate", "cache", "--epochs", "2",
        "--total-seq-len", "48", "--concurrency", "2", "--prefetch", "2", "--hidden-states-memory-cache", "0",
    )  # fmt: skip
    with server_process(corpus.verifier, storage) as server:
        args += ["--vllm-endpoint", server.base + "/v1"]
        done = subprocess.run(
            [*tmpfs_prefix(cache), sys.executable, "-m", "mtptune.cli.main", *args],
            capture_output=True, text=True, env=CHILD_ENV, timeout=300,
        )  # fmt: skip
        left = sorted(p.name for p in storage.iterdir())
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert log.count("is full") == 1 and str(cache) in log and "--on-generate delete" in log, log[-4000:]
    assert left == [], f"server files left behind: {left}"
    summary = next(r for r in records(save, "summary"))
    counts = summary["server"]
    assert counts["cached"] > 0 and counts["not_cached"] > 0, counts
    assert counts["failed"] == 0, counts
    assert len(records(save, "val")) == 2  # one validation per epoch (no initial one)
    assert (save / "checkpoint_best").exists()
    json.loads((Path(save) / "checkpoint_best" / "training_state.json").read_text())
