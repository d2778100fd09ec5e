"""One trainer per --save-path: an exclusive `flock` on `<save-path>/.train.lock`, held for the whole run.

Two trainers writing one folder interleave `metrics.jsonl` and overwrite each other's checkpoints, and one run's
work is lost without a word. The second trainer therefore stops before it writes anything, naming the first
(pid, host, start time, command: what the lock file holds). The kernel drops a `flock` when its process dies, so
the lock of a crashed or killed trainer is simply taken over (and said so). The file is removed when the run
ends; between the `open` and the `flock` another trainer may have done that, so the lock is only ours once the
path still names the very file we locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from mtptune.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"


class RunLock:
    """The held lock; `release()` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, save_path: Path) -> RunLock:
        """Lock `save_path` (created if needed) for this process, or raise ConfigError naming the holder."""
        path = save_path / LOCK_NAME
        try:
            save_path.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise ConfigError(
                        f"--save-path {save_path} is in use by another trainer ({_describe(holder)}); two runs in "
                        "one folder would overwrite each other's checkpoints and metrics. Wait for it to finish, stop "
                        "it, or pass another --save-path."
                    ) from None
                if _same_file(fd, path):
                    break
                os.close(fd)  # the previous holder removed the file between our open and flock: lock the new one
            previous = _read_holder(fd)
            if previous:
                log.warning(
                    "--save-path %s: taking over the lock of a trainer that is no longer running (%s).",
                    save_path,
                    _describe(previous),
                )
            _write_holder(fd)
        except OSError as exc:
            raise ConfigError(f"--save-path {save_path} is not writable: {exc}") from exc
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order: see the module docstring)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int) -> None:
    body = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv),
    }
    data = (json.dumps(body) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _describe(holder: dict) -> str:
    if not holder:
        return "pid and host unknown"
    parts = [f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"]
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    if holder.get("command"):
        parts.append(f"command: {holder['command']}")
    return ", ".join(parts)
