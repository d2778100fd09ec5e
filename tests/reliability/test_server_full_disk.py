"""A full disk under the server's storage folder, for real: the server runs in its own user and mount namespace
(`unshare --user --map-root-user --mount`, no root needed where unprivileged user namespaces are enabled, as on
most Linux) with a 64 KiB tmpfs mounted over its storage folder, so the file system really fills up. The test
reads that folder through `/proc/<server pid>/root`, the server's own view of the mounts.

The failure the server cannot foresee (the disk fills between its space check and the write) is caused with
RLIMIT_FSIZE instead: the kernel refuses the capture file's write with EFBIG at the same call where a full disk
would give ENOSPC."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mtptune.serving.hidden_state_files import read_hidden_states_file
from mtptune.testing.server_process import server_process

TMPFS_BYTES = 64 * 1024
PROMPT = list(range(10, 70))  # 60 tokens: a 7.7 KiB file (one layer, H=64, bf16), 3 tmpfs blocks with the header


def tmpfs_prefix(mount: Path) -> list[str]:
    """Runs the server in a new user + mount namespace with a tmpfs of TMPFS_BYTES over `mount`."""
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(TMPFS_BYTES), str(mount)]


@pytest.fixture(scope="module")
def namespaces_work(tmp_path_factory):
    probe = tmp_path_factory.mktemp("probe")
    try:
        done = subprocess.run([*tmpfs_prefix(probe), "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run unshare here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"no unprivileged mount namespace with a tmpfs here: {done.stderr.decode().strip()}")


def capture(base: str, ids: list[int]) -> httpx.Response:
    return httpx.post(base + "/v1/completions", json={"prompt": ids, "max_tokens": 1}, timeout=60)


def wait_until_written(folder: Path, names: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all((folder / n).exists() for n in names):
        assert time.monotonic() < deadline, f"{names} not written in {timeout} s"
        time.sleep(0.05)


def test_full_storage_is_a_507_naming_the_folder_and_leaves_no_file(corpus, namespaces_work, tmp_path):
    storage = tmp_path / "hs"
    storage.mkdir()
    with server_process(corpus.verifier, storage, prefix=tmpfs_prefix(storage)) as server:
        view = Path(f"/proc/{server.proc.pid}/root") / storage.relative_to("/")  # the server's tmpfs
        stat = os.statvfs(view)
        assert stat.f_blocks * stat.f_frsize == TMPFS_BYTES  # really the tiny file system, not tmp_path's disk
        written: list[str] = []
        refusal = None
        for _ in range(20):
            response = capture(server.base, PROMPT)
            if response.status_code != 200:
                refusal = response
                break
            written.append(Path(response.json()["kv_transfer_params"]["hidden_states_path"]).name)
        assert refusal is not None and len(written) >= 2, f"{len(written)} captures fit in {TMPFS_BYTES} bytes"
        assert refusal.status_code == 507, refusal.text
        error = refusal.json()["error"]
        assert error["type"] == "InsufficientStorageError" and error["code"] == 507
        assert str(storage) in error["message"] and "full" in error["message"]
        # Every answered capture's file is complete; the refused one left nothing (no .partial, no .lock).
        wait_until_written(view, written)
        assert sorted(p.name for p in view.iterdir()) == sorted([*written, *(n + ".lock" for n in written)])
        for name in written:
            read_hidden_states_file(view / name, PROMPT, 1, 64)
        # Space freed by a client (it deletes what it has read) is seen at once: captures succeed again.
        for name in written[:2]:
            (view / name).unlink()
            (view / (name + ".lock")).unlink()
        again = capture(server.base, PROMPT)
        assert again.status_code == 200, again.text


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (TMPFS_BYTES, TMPFS_BYTES))


def test_a_write_that_fails_after_the_answer_leaves_no_partial_file(corpus, tmp_path):
    storage = tmp_path / "hs"
    # Four layers: a 200-token file is ~104 KiB, over the limit; a 10-token one is ~5 KiB.
    flags = ("--target-layer-ids", "1", "2", "3", "--include-last-layer")
    with server_process(corpus.verifier, storage, *flags, preexec_fn=_limit_file_size) as server:
        big = capture(server.base, list(range(10, 210)))
        assert big.status_code == 200, big.text  # the disk has room: nothing foreseeable
        path = Path(big.json()["kv_transfer_params"]["hidden_states_path"])
        deadline = time.monotonic() + 10
        while "writing" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.05)
        log = server.log.read_text()
        assert f"writing {path} failed" in log and "File too large" in log
        while list(storage.iterdir()):  # the log line comes just before the clean-up
            assert time.monotonic() < deadline, list(storage.iterdir())  # a .partial or an orphaned .lock stayed
            time.sleep(0.05)
        metrics = httpx.get(server.base + "/metrics").text
        assert "mtptune_file_write_failures_total 1" in metrics
        small = capture(server.base, list(range(10, 20)))
        assert small.status_code == 200
        wait_until_written(storage, [Path(small.json()["kv_transfer_params"]["hidden_states_path"]).name])
