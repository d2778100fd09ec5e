"""Where a row's hidden states come from: one interface for training and evaluation.

A source streams `(row, r_t)` for every row, in order: r_t `[T, H]` is the verifier's layer-N residual before the
final norm (docs/contracts.md, "Layer ids"), which `MtpHead.residual_to_inputs` turns into the head's input. A row
whose states cannot be had yields an exception instead; the consumer counts it or stops (training's
`take_rows`, evaluation's `evaluate_offline`).

* `ServerSource`: a hidden-state server (vLLM or the built-in one) through the client: online / hybrid.
* `FolderSource`: pre-written `hs_{row}.safetensors` files: offline.
* `ColocatedSource` (serving/colocated.py): the verifier's forward in this very process: no HTTP, no files.
* `CachedSource`: any of them behind a bounded in-memory cache (serving/memory_cache.py), so epochs after the
  first reuse the states instead of asking for them again.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from mtptune.data.rows import Row
from mtptune.errors import DataError, ServerError
from mtptune.serving.contract import CaptureSpec, mtp_residual
from mtptune.serving.hidden_state_files import HiddenStatesInvalid, read_hidden_states_file
from mtptune.serving.memory_cache import HiddenStateCache

Result = torch.Tensor | Exception


class HiddenSource(Protocol):
    def stream(self, rows: Iterable[Row]) -> Iterator[tuple[Row, Result]]:
        """(row, r_t [T, H] or the exception that kept it from us) for every row, in input order."""
        ...

    def stats(self) -> dict:
        """Counters for the run's summary (requests, cache hits, forwards ...)."""
        ...

    def close(self) -> None: ...


class MissingHiddenStates(DataError):
    """No hidden-state file for a row and the run may not generate one (`--on-missing skip|warn`)."""


def hidden_states_file(cache_dir: Path, row_id: int) -> Path:
    return Path(cache_dir) / f"hs_{row_id}.safetensors"


class FolderSource:
    """Offline: read `hs_{row}.safetensors` from a folder; never talks to a server. `on_missing` "raise" stops at
    the first missing or bad file; otherwise such rows yield an exception for the consumer to count."""

    def __init__(
        self, cache_dir: Path, on_missing: str, spec: CaptureSpec | None, hidden_size: int, dtype: torch.dtype
    ):
        self.cache_dir = Path(cache_dir)
        self.on_missing = on_missing
        self.spec = spec
        self.hidden_size = hidden_size
        self.dtype = dtype
        if not self.cache_dir.is_dir():
            raise DataError(
                f"hidden-state folder {self.cache_dir} does not exist (--on-missing {on_missing} reads pre-written "
                "hs_{row}.safetensors files; use --on-missing generate with --vllm-endpoint to fetch them online)."
            )

    def stream(self, rows: Iterable[Row]) -> Iterator[tuple[Row, Result]]:
        for row in rows:
            path = hidden_states_file(self.cache_dir, row.row_id)
            if not path.exists():
                if self.on_missing == "raise":
                    raise DataError(
                        f"{path} is missing (--on-missing raise). Generate it with a hidden-state server "
                        "(--on-missing generate --vllm-endpoint URL) or pass --on-missing skip."
                    )
                yield row, MissingHiddenStates(f"{path} is missing")
                continue
            try:
                # Files written for the full row also serve a row truncated to --total-seq-len: compare the prefix.
                states = read_hidden_states_file(path, None, None, self.hidden_size, spec=self.spec)
                n = len(row)
                if states.token_ids.numel() < n or not torch.equal(states.token_ids[:n], row.input_ids):
                    raise HiddenStatesInvalid(
                        "token_mismatch", f"{path}: token_ids differ from row {row.row_id} of the prepared data."
                    )
            except ServerError as exc:
                if self.on_missing == "raise":
                    raise DataError(
                        f"{exc} (--on-missing raise). Delete the file and regenerate it (--on-missing generate "
                        "--vllm-endpoint URL), or pass --on-missing skip to count and skip such rows."
                    ) from exc
                yield row, exc
                continue
            yield row, states.mtp_residual()[:n].to(self.dtype)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class ServerSource:
    """Online / hybrid: the hidden-state client (async, `concurrency` requests in flight, order preserved)."""

    def __init__(
        self, client, spec: CaptureSpec | None, prefetch: int, dtype: torch.dtype, prefetch_tokens: int | None = None
    ):
        self.client = client
        self.spec = spec
        self.prefetch = prefetch
        self.prefetch_tokens = prefetch_tokens
        self.dtype = dtype

    def stream(self, rows: Iterable[Row]) -> Iterator[tuple[Row, Result]]:
        sent: deque[Row] = deque()  # rows handed to the client, not yet answered (it answers in order)

        def items() -> Iterator[tuple[int, list[int]]]:
            for row in rows:
                sent.append(row)
                yield row.row_id, row.input_ids.tolist()

        for row_id, result in self.client.iter_fetch(items(), prefetch=self.prefetch, max_tokens=self.prefetch_tokens):
            row = sent.popleft()
            if row_id != row.row_id:
                raise RuntimeError(f"hidden states arrived out of order: expected row {row.row_id}, got {row_id}")
            if isinstance(result, Exception):
                yield row, result
            elif self.spec is not None and result.spec is not None and result.spec != self.spec:
                yield (
                    row,
                    HiddenStatesInvalid(
                        "layer_mismatch",
                        f"row {row_id}: the server captured {result.spec.describe()}, but this run expects "
                        f"{self.spec.describe()}; start the server and the trainer with the same --target-layer-ids.",
                    ),
                )
            else:
                yield row, mtp_residual(result.hidden_states, result.spec or self.spec).to(self.dtype)

    def stats(self) -> dict:
        """The client's counters: requested / succeeded / retried / failed / invalid / cache_hits / generated."""
        return {"server": dataclasses.asdict(self.client.stats)}

    def close(self) -> None:
        self.client.close()


class CachedSource:
    """`inner` behind a bounded in-memory cache: a cached row is answered at once; every other row is asked of
    `inner` (in order, so its own batching and prefetching still work) and its states are kept for next time."""

    def __init__(self, inner: HiddenSource, cache: HiddenStateCache) -> None:
        self.inner = inner
        self.cache = cache

    def stream(self, rows: Iterable[Row]) -> Iterator[tuple[Row, Result]]:
        queued: deque[tuple[Row, torch.Tensor | None]] = deque()  # every row seen, with its cached states if any

        def misses() -> Iterator[Row]:
            for row in rows:
                hit = self.cache.get(row.row_id, len(row))
                queued.append((row, hit))
                if hit is None:
                    yield row

        for row, result in self.inner.stream(misses()):
            while queued[0][1] is not None:  # cached rows that came before this one
                yield queued.popleft()  # type: ignore[misc]
            queued_row, _ = queued.popleft()
            if queued_row is not row:
                raise RuntimeError(f"cached source: row {row.row_id} answered out of order")
            if not isinstance(result, Exception):
                result = self.cache.put(row.row_id, result)
            yield row, result
        while queued:
            yield queued.popleft()  # type: ignore[misc]

    def stats(self) -> dict:
        return {**self.inner.stats(), "memory_cache": self.cache.stats()}

    def close(self) -> None:
        self.inner.close()
