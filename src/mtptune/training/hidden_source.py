"""Where a row's hidden states come from, fetched ahead of the step.

* online / hybrid (`--on-missing generate`): the hidden-state client asks the server (vLLM or the built-in one)
  and itself uses a cached `hs_{row}.safetensors` when present, then deletes or caches the server file.
* offline (`--on-missing raise|skip|warn`): a folder of `hs_{row}.safetensors` files; a missing file raises,
  is skipped silently-but-counted, or is skipped with a warning.

`prefetch` runs a source in a background thread with a bounded queue so the fetches for the next steps overlap
the current one; it measures how long the trainer waited on it (the "wait fraction" of the progress bar).
The MTP input is the last captured layer (`hidden_states[:, -1]`), the verifier's pre-final-norm residual r_t.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtptune.errors import DataError, ServerError
from mtptune.serving.client import ServerUnavailable
from mtptune.serving.hidden_state_files import HiddenStates, HiddenStatesInvalid, read_hidden_states_file
from mtptune.training.background import Background
from mtptune.training.batching import Row
from mtptune.training.config import HiddenStatesConfig

log = logging.getLogger(__name__)

FetchResult = tuple[int, "torch.Tensor | Exception"]


class MissingHiddenStates(DataError):
    """No hidden-state file for a row and the run may not generate one (`--on-missing skip|warn`)."""


def hidden_states_file(cache_dir: Path, row_id: int) -> Path:
    return Path(cache_dir) / f"hs_{row_id}.safetensors"


def mtp_input(states: HiddenStates, dtype: torch.dtype) -> torch.Tensor:
    """[T, H]: the last captured layer (layer N, pre-final-norm residual)."""
    return states.hidden_states[:, -1].to(dtype)


@dataclass
class SourceStats:
    loaded: int = 0
    missing: int = 0
    invalid: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "loaded": self.loaded,
            "missing": self.missing,
            "invalid": self.invalid,
            "failed": self.failed,
            "invalid_reasons": dict(self.reasons),
        }


class FolderSource:
    """Offline: read `hs_{row}.safetensors` from a folder; never talks to a server."""

    def __init__(self, cache_dir: Path, on_missing: str, num_layers: int, hidden_size: int, dtype: torch.dtype):
        self.cache_dir = Path(cache_dir)
        self.on_missing = on_missing
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.dtype = dtype
        if not self.cache_dir.is_dir():
            raise DataError(
                f"hidden-state folder {self.cache_dir} does not exist (--on-missing {on_missing} reads pre-written "
                "hs_{row}.safetensors files; use --on-missing generate with --vllm-endpoint to fetch them online)."
            )

    def stream(self, rows: Iterable[Row]) -> Iterator[FetchResult]:
        for row in rows:
            path = hidden_states_file(self.cache_dir, row.row_id)
            if not path.exists():
                if self.on_missing == "raise":
                    raise DataError(
                        f"{path} is missing (--on-missing raise). Generate it with a hidden-state server "
                        "(--on-missing generate --vllm-endpoint URL) or pass --on-missing skip."
                    )
                yield row.row_id, MissingHiddenStates(f"{path} is missing")
                continue
            try:
                # Files written for the full row also serve a row truncated to --total-seq-len: compare the prefix.
                states = read_hidden_states_file(path, None, None, self.hidden_size)
                n = row.input_ids.numel()
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
                yield row.row_id, exc
                continue
            yield row.row_id, mtp_input(states, self.dtype)[:n]

    def server_stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class ClientSource:
    """Online / hybrid: the hidden-state client (async, `concurrency` requests in flight, order preserved)."""

    def __init__(self, client, prefetch: int, dtype: torch.dtype):
        self.client = client
        self.prefetch = prefetch
        self.dtype = dtype

    def stream(self, rows: Iterable[Row]) -> Iterator[FetchResult]:
        items = ((row.row_id, row.input_ids.tolist()) for row in rows)
        for row_id, result in self.client.iter_fetch(items, prefetch=self.prefetch):
            yield row_id, result if isinstance(result, Exception) else mtp_input(result, self.dtype)

    def server_stats(self) -> dict:
        """The client's counters: requested / succeeded / retried / failed / invalid / cache_hits / generated."""
        return dataclasses.asdict(self.client.stats)

    def close(self) -> None:
        self.client.close()


def build_source(config: HiddenStatesConfig, data_path: str, verifier_name: str, hidden_size: int):
    dtype = getattr(torch, config.dtype)
    cache_dir = config.cache_dir(data_path)
    if config.on_missing != "generate":
        if config.endpoints:
            log.warning(
                "--vllm-endpoint is ignored with --on-missing %s: rows are read only from %s.",
                config.on_missing,
                cache_dir,
            )
        return FolderSource(cache_dir, config.on_missing, config.num_layers, hidden_size, dtype)
    from mtptune.serving.client import HiddenStatesClient

    client = HiddenStatesClient(
        endpoints=list(config.endpoints),
        model_id=verifier_name,
        num_layers=config.num_layers,
        hidden_size=hidden_size,
        on_generate=config.on_generate,
        cache_dir=cache_dir,
        request_timeout=config.request_timeout,
        max_retries=config.max_retries,
        concurrency=config.concurrency,
        api_key=config.api_key,
        server_wait_timeout=config.server_wait_timeout,
    )
    client.check_model()
    return ClientSource(client, config.prefetch, dtype)


def prefetch(source, rows: Iterable[Row], depth: int) -> Background:
    """`source.stream(rows)` in a background thread, at most `depth` rows ahead of the consumer; yields each
    `(row, hidden states or exception)`, so that the consumer never builds a row again."""
    sent: deque[Row] = deque()  # rows handed to the source, not yet answered (the source answers in order)

    def remember() -> Iterator[Row]:
        for row in rows:
            sent.append(row)
            yield row

    def answered() -> Iterator[tuple[Row, object]]:
        for row_id, result in source.stream(remember()):
            row = sent.popleft()
            if row_id != row.row_id:
                raise RuntimeError(f"hidden states arrived out of order: expected row {row.row_id}, got {row_id}")
            yield row, result

    return Background(answered(), depth, "mtptune-prefetch")


def take_rows(
    prefetcher: Background, count: int, stats: SourceStats, on_missing: str, warn: Callable[[str], None]
) -> tuple[list[Row], list[torch.Tensor]]:
    """Pull the next `count` rows and their hidden states (in order) and keep the rows that have valid ones; count
    the others."""
    kept, hidden = [], []
    for _ in range(count):
        row, result = prefetcher.next()
        row_id = row.row_id
        if isinstance(result, ServerUnavailable):
            raise result  # skipping would lose the sample; the trainer saves a checkpoint and stops
        if isinstance(result, MissingHiddenStates):
            stats.missing += 1
            if on_missing == "warn":
                warn(f"row {row_id}: {result}; skipped")
            continue
        if isinstance(result, Exception):
            reason = getattr(result, "reason", None)
            if reason is not None:
                stats.invalid += 1
                stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
            else:
                stats.failed += 1
            warn(f"row {row_id}: hidden states rejected, sample skipped: {result}")
            continue
        if result.shape[0] != row.input_ids.numel():
            stats.invalid += 1
            warn(f"row {row_id}: {result.shape[0]} hidden-state rows for {row.input_ids.numel()} tokens; skipped")
            continue
        stats.loaded += 1
        kept.append(row)
        hidden.append(result)
    return kept, hidden
