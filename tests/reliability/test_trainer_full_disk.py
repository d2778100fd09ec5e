"""The server's storage folder fills up mid-training (issue 22, the known gap "full disk under the server's
storage"), for real: a 64 KiB tmpfs over it, in the server's own user + mount namespace (as in
test_server_full_disk.py), and the trainer entered into the same namespaces (`nsenter`) so that it reads the files
where the server writes them. The server answers 507 with its explanation; the trainer retries that only
--max-retries times (its own deletions could free space), then stops with exit 2, the server's message as it is
and a resumable `interrupted/`; once space is freed, the same command resumes and finishes.

Deleting a file the trainer has read frees its space only once nothing maps it any more: safetensors maps the
file, and the memory cache kept those tensors for the whole run, so `--on-generate delete` freed nothing (the
64 KiB folder filled up while it looked empty). The client copies the tensors out of each file it reads."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mtptune.testing.server_process import server_process

from .conftest import CHILD_ENV, records, train_args, wait_for_step
from .test_server_full_disk import namespaces_work, tmpfs_prefix  # noqa: F401  (the fixture is used by name)

EPOCHS = 2


class Filler:
    """Keeps a file growing in `folder` while it runs: whatever space the trainer frees, the filler takes."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "filler"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with open(self.path, "ab", buffering=0) as f:
            while not self._stop.is_set():
                try:
                    f.write(b"\0" * 4096)
                except OSError:
                    time.sleep(0.005)

    def __enter__(self) -> Filler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.path.unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.usefixtures("namespaces_work")
def test_a_full_storage_folder_stops_the_trainer_with_the_servers_message_and_resumes(corpus, tmp_path):
    storage, save = tmp_path / "hs", tmp_path / "ckpt"
    storage.mkdir()
    args = train_args(
        corpus, save, "--hidden-states-path", str(tmp_path / "cache"), "--epochs", str(EPOCHS),
        "--total-seq-len", "48", "--concurrency", "2", "--prefetch", "2", "--max-retries", "1",
    )  # fmt: skip
    with server_process(corpus.verifier, storage, prefix=tmpfs_prefix(storage)) as server:
        view = Path(f"/proc/{server.proc.pid}/root") / storage.relative_to("/")  # the server's tmpfs
        args += ["--vllm-endpoint", server.base + "/v1"]
        # The trainer in the server's namespaces: it sees the tmpfs where the server writes.
        enter = ["nsenter", "--target", str(server.proc.pid), "--user", "--mount", "--preserve-credentials"]
        log = tmp_path / "train.log"
        with open(log, "w") as out:
            trainer = subprocess.Popen(
                [*enter, sys.executable, "-m", "mtptune.cli.main", *args], stdout=out, stderr=subprocess.STDOUT,
                env=CHILD_ENV,
            )  # fmt: skip
        try:
            wait_for_step(save, 2, trainer)
            with Filler(view):
                started = time.monotonic()
                assert trainer.wait(timeout=120) == 2, log.read_text()[-3000:]
                stopped_in = time.monotonic() - started
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait()
        text = log.read_text()
        # The server's error.message, as it wrote it, then what was saved and what to do.
        assert "HTTP 507" in text and "--max-retries 1" in text, text[-3000:]
        assert f"The server says:\nthe server's hidden-state storage folder {storage} is full" in text
        assert "Saved a resumable checkpoint" in text and "free space in the server's storage folder" in text
        assert "Traceback" not in text
        assert stopped_in < 60  # --max-retries, not --server-wait-timeout (600 s)
        state = json.loads((save / "interrupted" / "training_state.json").read_text())
        assert state["global_step"] >= 2

        # Space freed (the filler is gone): the same command resumes and finishes the planned epochs.
        resumed = subprocess.run(
            [*enter, sys.executable, "-m", "mtptune.cli.main", *args], env=CHILD_ENV, capture_output=True, text=True
        )
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
        assert sorted(p.name for p in view.iterdir()) == []  # --on-generate delete: nothing left
    summary = records(save, "summary")[-1]
    assert summary["failed"] == 0 and summary["train_row_uses_max"] <= EPOCHS
    steps = [r["step"] for r in records(save, "train")]
    assert steps[-1] > state["global_step"]


def test_a_read_file_is_not_mapped_once_deleted(corpus, online_server):
    """The states the client returns hold no mapping of the server's (deleted) file: its disk space is free."""
    from mtptune.serving.client import HiddenStatesClient

    base, storage = online_server
    ids = corpus.rows[0]["input_ids"]
    with HiddenStatesClient([base], str(corpus.verifier), hidden_size=64) as client:
        [(_, states)] = list(client.iter_fetch([(0, ids)]))
        assert not isinstance(states, Exception), states
        maps = Path("/proc/self/maps").read_text()
        assert str(storage) not in maps, [line for line in maps.splitlines() if str(storage) in line]
        assert states.hidden_states.shape == (len(ids), 1, 64) and list(storage.iterdir()) == []
