"""How mtptune writes what others load: whole folders atomically, files with the user's umask, JSON that stays JSON.

Every folder mtptune hands to someone else (converted and exported heads, training checkpoints, stitched models,
built-in verifiers) is written through `atomic_folder`, so a crash never leaves a folder that looks complete and a
vLLM running as another user can read the result. Every JSON file goes through `json_text`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from mtptune.errors import CheckpointError


def umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything written under it the modes a plain `open`/`mkdir` would (0644/0755 under umask
    022): `mkdtemp` makes 0700 and safetensors' writer 0600, so a reader running as another user would be locked
    out. Hard links (more than one name) are left alone: they are someone else's file, e.g. an untouched verifier
    shard, whose mode is not ours to change."""
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(0o777 & ~mask)
        for name in files:
            path = Path(root, name)
            info = path.lstat()
            if path.is_symlink() or info.st_nlink > 1:
                continue
            executable = info.st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; on success it becomes `path`.

    The existing `path` (with `overwrite`) is moved aside first, the new folder renamed into place, and only then is
    the old one deleted: deleting in place could leave a half-deleted folder that still looks complete after a crash.
    On any failure the temporary folder is removed and `path` is left as it was. OS and safetensors errors (disk
    full, permission denied) become a CheckpointError naming `path`.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise CheckpointError(f"{path} already exists; pass --overwrite (or choose another --output-path).")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write {what} {path}: {exc} (not writable?)") from exc
    try:
        yield tmp
        apply_umask(tmp)
        _replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {what} {path}: {exc} (disk full or not writable?)") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temporary(name: str, target: str) -> bool:
    """Whether a folder entry called `name` is one of `atomic_folder`'s temporary siblings for `target`."""
    return name.startswith((f".{target}.tmp-", f".{target}.old-"))


def _replace(tmp: Path, path: Path) -> None:
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        try:
            os.replace(path, old / path.name)
        except BaseException:
            old.rmdir()
            raise
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:  # put the old folder back: the failure must leave `path` as it was
            os.replace(old / path.name, path)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def json_text(body: object) -> str:
    """`body` as indented JSON text. JSON has no NaN or Infinity (Python's bare `NaN` breaks every other reader), so a
    non-finite float is written as null: a diverged metric must not cost the checkpoint it belongs to, and null reads
    back as "no value" everywhere (e.g. `best_tau_sim: null` means no best yet)."""
    return json.dumps(_finite(body), indent=2, allow_nan=False) + "\n"


def json_line(body: object) -> str:
    """One JSON Lines record (no indentation), non-finite floats as null like `json_text`."""
    return json.dumps(_finite(body), allow_nan=False) + "\n"


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
