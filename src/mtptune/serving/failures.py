"""Hidden-state failures that stop a training run instead of costing one row.

A row whose states are bad for a reason of its own (a corrupt file, NaN in it, a server killed mid-write) is
counted and skipped. Some errors, though, repeat for every row: retrying them, or skipping row after row, burns
hours of GPU time and ends with an untrained head. Those stop the run at once (the trainer saves a resumable
checkpoint when it has trained anything, then exits 2 with the message):

* `ServerUnavailable`: no server answered for longer than `--server-wait-timeout`;
* `ServerStorageFull`: the server's storage folder stayed full (HTTP 507) over `--max-retries` attempts;
* `SystematicFailure`: every row would fail the same way: hidden states of another verifier or other layers
  (`SYSTEMATIC_REASONS`), a storage folder the trainer may not read, or a request the server refuses (a 4xx).
"""

from __future__ import annotations

from mtptune.errors import ServerError
from mtptune.serving.hidden_state_files import HiddenStatesInvalid

# Reasons of HiddenStatesInvalid that say "these states are not for this run" rather than "this file is bad":
# another hidden size or layer count (`shape`), other captured layers, not a hidden-state file at all.
SYSTEMATIC_REASONS = frozenset({"shape", "layer_mismatch", "missing_key"})


class ServerUnavailable(ServerError):
    """No server answered (connection refused, 5xx, 429) for longer than the wait limit; the trainer must stop
    (saving a resumable checkpoint) rather than skip the sample."""


class ServerStorageFull(ServerError):
    """The server answered HTTP 507 (its storage folder is full) on every attempt; the message carries the
    server's own explanation."""


class SystematicFailure(ServerError):
    """An error that every row would hit; the run stops at the first one instead of retrying or skipping."""


def mismatch_failure(exc: HiddenStatesInvalid, verifier: str | None) -> SystematicFailure:
    """The run-stopping form of an invalid file whose reason is in SYSTEMATIC_REASONS."""
    fix = (
        "The hidden states must come from the verifier this run trains for"
        + (f" ({verifier})" if verifier else "")
        + ", captured with the same --target-layer-ids: start the server (or write the files) with that verifier "
        "and those layers."
    )
    return SystematicFailure(f"hidden states that do not fit this run (every row would be rejected): {exc}\n{fix}")


def is_systematic(exc: BaseException) -> bool:
    """A row's error that will repeat for every row."""
    return isinstance(exc, SystematicFailure) or (
        isinstance(exc, HiddenStatesInvalid) and exc.reason in SYSTEMATIC_REASONS
    )


def permission_denied(exc: BaseException) -> PermissionError | None:
    """The PermissionError behind `exc` (itself or its cause), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, PermissionError):
            return seen
        seen = seen.__cause__
    return None
