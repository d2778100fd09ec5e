"""The per-request hidden-state file of vLLM's `ExampleHiddenStatesConnector` (docs/contracts.md,
"Hidden-state files", "The lock protocol", "Validating a file").

One safetensors file per request: `hidden_states [T, n_ids, H]` (model dtype) and `token_ids [T]` (int64), guarded by a
sibling `<file>.lock` that the writer holds an exclusive `flock` on until the write has finished. The built-in server
writes through `HiddenStatesWriteLock` + `write_hidden_states_file`; the trainer reads files from either server through
`read_hidden_states_file`, so real vLLM and mtptune's server share one read path.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mtptune.errors import ServerError
from mtptune.serving.contract import CaptureSpec, mtp_residual

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".partial"  # a file being written; renamed to its final name when complete
# The reader polls a held lock after 1 ms, then twice as long each time up to 100 ms: the built-in server answers
# before its file is written and finishes it a few ms later, so a fixed 100 ms poll could add ~100 ms to a request.
LOCK_POLL_FIRST = 0.001
LOCK_POLL_INTERVAL = 0.1
INVALID_REASONS = (
    "missing_key", "token_mismatch", "shape", "layer_mismatch", "non_finite", "all_zero", "unreadable"
)  # fmt: skip
_FINITE_CHUNK_ROWS = 256


@dataclass(frozen=True)
class HiddenStates:
    token_ids: torch.Tensor  # [T] int64
    hidden_states: torch.Tensor  # [T, n_layers, H], model dtype
    spec: CaptureSpec | None = None  # the layers the file declares it holds (mtptune's server); None: vLLM's file

    def mtp_residual(self) -> torch.Tensor:
        """[T, H]: layer N, the residual the head's input is computed from."""
        return mtp_residual(self.hidden_states, self.spec)


class HiddenStatesInvalid(ServerError):
    """A hidden-state file failed validation; `reason` is one of INVALID_REASONS (the client counts them)."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in INVALID_REASONS:
            raise ValueError(f"unknown HiddenStatesInvalid reason {reason!r}")
        super().__init__(message)
        self.reason = reason


def lock_path_for(path: str | os.PathLike) -> Path:
    return Path(str(path) + LOCK_SUFFIX)


# --- writer side (the built-in server) -------------------------------------------------------------------------
class HiddenStatesWriteLock:
    """Create `<file>.lock` and hold an exclusive flock on it; `release()` closes the fd once the file is written.

    Acquire before the path is returned to the client and release after the write (docs/contracts.md, "The lock
    protocol").
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(lock_path_for(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the fd drops the flock
            self._fd = None


# safetensors dtype names (the format's spec) of the tensors a hidden-state file holds.
_SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}


def write_hidden_states_file(
    path: str | os.PathLike,
    hidden_states: torch.Tensor,
    token_ids: torch.Tensor,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one request's file; the temp-name + rename keeps a half-written file from ever carrying the final name.
    `metadata` (the server's `CaptureSpec.to_metadata()`) lands in the safetensors header's `__metadata__`.

    The safetensors layout is written by hand (8-byte header length, JSON header, raw bytes): `safetensors.save`
    first builds the whole file as one Python bytes object, holding the GIL for the copy, while `write` of the
    tensor's own buffer copies once and releases the GIL, so the model thread keeps launching kernels meanwhile.
    It also never makes the hidden `.tmpXXXXXX` file of `save_file`, which a killed server would leave behind.
    """
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    # token_ids (8-byte items) first keeps both tensors aligned to their item size, as safetensors itself does.
    tensors = {
        "token_ids": token_ids.detach().to("cpu", torch.int64).contiguous(),
        "hidden_states": hidden_states.detach().to("cpu").contiguous(),
    }
    header: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    buffers = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: cannot write {name} of dtype {tensor.dtype} as safetensors.")
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        buffers.append(data)
        offset += data.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for data in buffers:
            f.write(data)
    os.chmod(tmp, 0o644)  # the trainer may run as another user on the shared storage
    os.replace(tmp, path)


def remove_abandoned_writes(storage_dir: str | os.PathLike) -> int:
    """Delete what a killed writer left behind in `storage_dir`: `.partial` files and `.lock` files that no live
    process holds and whose data file never appeared (their request never got a response, so no client will
    ever delete them). Completed files are kept: a client may still be about to read one. Returns the count."""
    removed = 0
    for lock in Path(storage_dir).glob("*" + LOCK_SUFFIX):
        data = Path(str(lock)[: -len(LOCK_SUFFIX)])
        if data.exists():
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer (another server sharing the folder) holds it
        finally:
            os.close(fd)
        data.with_name(data.name + PARTIAL_SUFFIX).unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
        removed += 1
    for partial in Path(storage_dir).glob("*" + PARTIAL_SUFFIX):
        if not lock_path_for(Path(str(partial)[: -len(PARTIAL_SUFFIX)])).exists():
            partial.unlink(missing_ok=True)
            removed += 1
    return removed


# --- reader side (the trainer's client) ------------------------------------------------------------------------
def wait_for_writer(path: str | os.PathLike, lock_timeout: float = 10.0) -> None:
    """Wait until no writer holds `<file>.lock` (speculators' variant: poll a non-blocking exclusive flock, here with
    a backoff from 1 to 100 ms).

    The lock is opened read-write because a read-only fd cannot take an exclusive flock on NFS (speculators#948).
    A missing lock means the writer is done (or never used one). Raises HiddenStatesInvalid('unreadable') on timeout.
    """
    lock = lock_path_for(path)
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        deadline = time.monotonic() + lock_timeout
        pause = LOCK_POLL_FIRST
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HiddenStatesInvalid(
                        "unreadable",
                        f"{path}: the writer still holds {lock} after {lock_timeout:.1f} s; the file may be "
                        "incomplete (slow shared storage? raise the lock timeout).",
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, LOCK_POLL_INTERVAL)
    finally:
        os.close(fd)


def read_hidden_states_file(
    path: str | os.PathLike,
    expected_token_ids: Sequence[int] | None,
    num_layers: int | None,
    hidden_size: int | None,
    lock_timeout: float = 10.0,
    spec: CaptureSpec | None = None,
) -> HiddenStates:
    """Wait for the writer's lock, load on CPU, and validate (docs/contracts.md, "Validating a file"); never returns a
    suspicious sample.

    `expected_token_ids` / `num_layers` / `hidden_size` = None skip that check. With `spec` (what the reader
    expects), a file that declares other layers is rejected (`layer_mismatch`) and `num_layers` defaults to the
    spec's count. Raises HiddenStatesInvalid.
    """
    wait_for_writer(path, lock_timeout)
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            declared = CaptureSpec.from_metadata(f.metadata())
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise HiddenStatesInvalid("unreadable", f"{path}: cannot load hidden-state file: {exc}") from exc
    if spec is not None:
        if declared is not None and declared != spec:
            raise HiddenStatesInvalid(
                "layer_mismatch",
                f"{path}: the server captured {declared.describe()}, but this run expects {spec.describe()}; "
                "start the server and the trainer with the same --target-layer-ids and verifier.",
            )
        num_layers = len(spec.layer_ids) if num_layers is None else num_layers
    for key in ("hidden_states", "token_ids"):
        if key not in tensors:
            raise HiddenStatesInvalid(
                "missing_key", f"{path}: no {key!r} tensor (has {sorted(tensors)}); not a hidden-state file?"
            )
    hidden, ids = tensors["hidden_states"], tensors["token_ids"]
    validate_hidden_states(str(path), hidden, ids, expected_token_ids, num_layers, hidden_size)
    return HiddenStates(token_ids=ids.to(torch.int64), hidden_states=hidden, spec=declared or spec)


def read_token_ids(path: str | os.PathLike) -> tuple[int, ...]:
    """Only the file's `token_ids` (what request it answers), without loading its hidden states."""
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            return tuple(f.get_tensor("token_ids").tolist())
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise HiddenStatesInvalid("unreadable", f"{path}: cannot read token_ids: {exc}") from exc


def validate_hidden_states(
    where: str,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    expected_token_ids: Sequence[int] | None,
    num_layers: int | None,
    hidden_size: int | None,
) -> None:
    if ids.dim() != 1:
        raise HiddenStatesInvalid("shape", f"{where}: token_ids has shape {tuple(ids.shape)}, expected [T].")
    if expected_token_ids is not None:
        expected = torch.as_tensor(list(expected_token_ids), dtype=torch.int64)
        if ids.shape != expected.shape or not torch.equal(ids.to(torch.int64), expected):
            raise HiddenStatesInvalid(
                "token_mismatch",
                f"{where}: token_ids ({ids.numel()} ids, first {ids[:8].tolist()}) differ from the sent ids "
                f"({expected.numel()} ids, first {expected[:8].tolist()}).",
            )
    if hidden.dim() != 3:
        raise HiddenStatesInvalid(
            "shape", f"{where}: hidden_states has shape {tuple(hidden.shape)}, expected [T, n, H]."
        )
    want = (ids.numel(), num_layers, hidden_size)
    for axis, (got, exp) in enumerate(zip(hidden.shape, want)):
        if exp is not None and got != exp:
            raise HiddenStatesInvalid(
                "shape",
                f"{where}: hidden_states has shape {tuple(hidden.shape)}, expected [T={want[0]}, n_layers={num_layers}, "
                f"H={hidden_size}] (axis {axis} differs); check --target-layer-ids and the verifier.",
            )
    for start in range(0, hidden.shape[0], _FINITE_CHUNK_ROWS):
        chunk = hidden[start : start + _FINITE_CHUNK_ROWS]
        if not torch.isfinite(chunk).all():
            raise HiddenStatesInvalid("non_finite", f"{where}: hidden_states contains NaN/Inf (rows from {start}).")
    # A known vLLM bug on hybrid verifiers (vllm#46301) wrote all-zero states; a zero row is never a real residual.
    zero_rows = (hidden == 0).flatten(1).all(dim=1)
    if bool(zero_rows.any()):
        n = int(zero_rows.sum())
        raise HiddenStatesInvalid(
            "all_zero",
            f"{where}: {n} of {hidden.shape[0]} rows of hidden_states are exactly zero (the hybrid-model vLLM bug "
            "fixed by vllm#46301; upgrade vLLM).",
        )
