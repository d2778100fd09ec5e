"""Free space under the server's storage folder, checked before a capture's forward.

The server answers a capture before its file is written (the write overlaps the next forward), so a disk that fills
up during the write could only be logged: the client got a path to a file that never appeared. Each capture
therefore reserves its file's size first: when the folder's free space (`statvfs`), less what earlier captures
reserved and have not written yet, cannot hold the file, the request is refused with HTTP 507 naming the folder,
before any forward runs or any file is created. `statvfs` is sampled at most every `refresh_s` seconds (it is a
network round trip on NFS) and always again before refusing, so space freed by the trainer is seen at once.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

from mtptune.serving.protocol import Rejected

# Room for a capture file's JSON header (tensor names, shapes, offsets, metadata such as the captured layer ids).
HEADER_BYTES = 4096
# errnos that mean "this file system is full" (out of blocks, out of inodes on some, over a quota).
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
INSUFFICIENT_STORAGE = 507


def storage_full(folder: Path, detail: str) -> Rejected:
    """The 507 a capture gets when its file cannot be stored; the client should not retry it for long."""
    return Rejected(
        INSUFFICIENT_STORAGE,
        f"the server's hidden-state storage folder {folder} is full: {detail}. Free space there (a client that "
        "reads its files deletes them, --on-generate delete) or restart the server with --hidden-states-path on "
        "a larger disk.",
        "InsufficientStorageError",
    )


class StorageSpace:
    """Reservations of capture-file bytes against a folder's free space (thread-safe: released by the writers)."""

    def __init__(self, folder: Path, refresh_s: float = 0.1) -> None:
        self.folder = folder
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._free = 0  # bytes free at the last statvfs
        self._sampled = -float("inf")
        self._pending = 0  # bytes reserved and not yet written (or failed)
        self._charged = 0  # bytes to subtract from _free: pending at the sample + reserved since
        self._block = 0  # the file system's block size (0: not read yet)

    def file_bytes(self, tokens: int, bytes_per_token: int) -> int:
        """What a capture file of `tokens` rows takes on this file system (rounded up to whole blocks)."""
        raw = tokens * bytes_per_token + HEADER_BYTES
        block = self._block_size()
        return -(-raw // block) * block

    def reserve(self, nbytes: int) -> None:
        """Take `nbytes` of the folder's free space, or raise the 507 `Rejected` naming the folder."""
        with self._lock:
            if time.monotonic() - self._sampled > self.refresh_s:
                self._sample()
            if self._free - self._charged < nbytes:
                self._sample()
                available = self._free - self._charged
                if available < nbytes:
                    raise storage_full(
                        self.folder, f"{max(available, 0):,} bytes free for new files, this capture needs {nbytes:,}"
                    )
            self._pending += nbytes
            self._charged += nbytes

    def release(self, nbytes: int) -> None:
        """The reserved file was written (it now shows in statvfs) or was not (its space is free again)."""
        with self._lock:
            self._pending -= nbytes

    def _sample(self) -> None:
        try:
            stat = os.statvfs(self.folder)
        except OSError as exc:
            raise Rejected(
                500, f"cannot read the free space of the storage folder {self.folder}: {exc}", "InternalServerError"
            ) from exc
        self._free = stat.f_bavail * stat.f_frsize
        self._sampled = time.monotonic()
        self._charged = self._pending

    def _block_size(self) -> int:
        if not self._block:
            try:
                self._block = max(os.statvfs(self.folder).f_frsize, 1)
            except OSError:
                return 4096
        return self._block
