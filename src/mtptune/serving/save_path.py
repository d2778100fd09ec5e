"""Where a capture's file goes: `<storage>/<request id>.safetensors`, or a path the request chose
(`kv_transfer_params.hidden_states_path`, only with `--allow-custom-save-path`).

A chosen path is checked completely before the forward, so that nothing the file system would refuse later (a NUL
byte, a name too long once `.partial` or `.lock` is appended, a folder that is not there, a directory in the way)
surfaces as a 500 after a lock file was already made: every such path is a 400 naming the field and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from mtptune.serving.protocol import Rejected

FIELD = "kv_transfer_params.hidden_states_path"
# The longest suffix the writer appends to the file's name (write_hidden_states_file's temp name, the lock).
LONGEST_SUFFIX = ".partial"


def _refuse(custom: str, why: str) -> Rejected:
    shown = custom if len(custom) <= 80 else custom[:77] + "..."
    return Rejected(400, f"{FIELD} {shown!r} {why}", param="kv_transfer_params")


def custom_save_path(storage_dir: Path, custom: str, allowed: bool) -> Path:
    """The checked absolute path for a request-chosen file inside `storage_dir` (already resolved)."""
    if not allowed:
        raise Rejected(
            400,
            f"{FIELD} is refused: start the server with --allow-custom-save-path to let requests choose their file.",
            param="kv_transfer_params",
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in custom):
        raise _refuse(custom, "contains a NUL or control character; use a plain relative file name.")
    try:
        encoded = os.fsencode(custom)
    except UnicodeEncodeError:
        raise _refuse(custom, "is not encodable as a file name here; use a plain relative file name.") from None
    name_max = _pathconf(storage_dir, "PC_NAME_MAX", 255)
    path_max = _pathconf(storage_dir, "PC_PATH_MAX", 4096)
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest + len(LONGEST_SUFFIX) > name_max:
        raise _refuse(
            custom, f"has a name of {longest} bytes; at most {name_max - len(LONGEST_SUFFIX)} fit in this folder."
        )
    if len(os.fsencode(storage_dir)) + 1 + len(encoded) + len(LONGEST_SUFFIX) >= path_max:
        raise _refuse(custom, f"is too long: the whole path must stay under {path_max} bytes.")
    path = (storage_dir / custom).resolve()
    if not path.is_relative_to(storage_dir) or path == storage_dir or path.suffix != ".safetensors":
        raise _refuse(custom, f"must be a *.safetensors file inside the storage directory {storage_dir}.")
    if not path.parent.is_dir():
        raise _refuse(custom, f"names folder {path.parent}, which does not exist; create it or drop the folder.")
    if path.is_dir():
        raise _refuse(custom, "is an existing directory; name a file.")
    return path


def _pathconf(folder: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(folder, name))
    except (OSError, ValueError):
        return default
