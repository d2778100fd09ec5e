"""The trainer's side of the hidden-state sources (serving/sources.py): which one a config asks for, fetching
ahead of the step, and counting every row that could not be used.

* online / hybrid (`--on-missing generate --vllm-endpoint URL`): a server, through the client (which itself uses
  a cached `hs_{row}.safetensors` when present, then deletes or caches the server's file);
* colocated (`--colocated`): the verifier in this process;
* offline (`--on-missing raise|skip|warn`): a folder of `hs_{row}.safetensors` files;
* each behind the in-memory cache (`--hidden-states-memory-cache`), so later epochs reuse epoch 0's states.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from mtptune.checkpoint.verifier import Verifier
from mtptune.data.rows import Row
from mtptune.errors import ConfigError, DataError
from mtptune.serving.contract import CaptureSpec, capture_spec
from mtptune.serving.failures import (
    ServerStorageFull,
    ServerUnavailable,
    SystematicFailure,
    is_systematic,
    mismatch_failure,
)
from mtptune.serving.hidden_state_files import HiddenStatesInvalid
from mtptune.serving.memory_cache import HiddenStateCache
from mtptune.serving.sources import CachedSource, FolderSource, HiddenSource, MissingHiddenStates, ServerSource
from mtptune.training.background import Background
from mtptune.training.config import HiddenStatesConfig

log = logging.getLogger(__name__)

COLOCATED_PREFETCH_ROWS = 4096  # a colocated source computes whole windows (~1,300 GSM8K rows); let it run one ahead


# Errors that stop the run at the row where they happen instead of costing that row (serving/failures.py).
STOPPING = (ServerUnavailable, ServerStorageFull, SystematicFailure)


class TooManyFailedRows(DataError):
    """More than --max-failed-fraction of the rows asked for had no usable hidden states."""


@dataclass
class FailedRows:
    """The failed-row fraction guard (`--max-failed-fraction F`, `--failed-fraction-window N`): the outcome of the
    last N rows asked for (training and validation), each usable or not (invalid or failed; rows missing under
    `--on-missing skip|warn` are the user's choice and do not count). Checked after each micro-batch once N rows
    were seen, and at the end of each epoch over what the window holds (a run shorter than N rows is checked too)."""

    max_fraction: float = 0.1
    window: int = 200
    outcomes: deque = field(default_factory=deque)  # True: failed
    failed_in_window: int = 0
    last_error: str = ""

    def record(self, failed: bool, error: str = "") -> None:
        self.outcomes.append(failed)
        self.failed_in_window += failed
        if len(self.outcomes) > self.window:
            self.failed_in_window -= self.outcomes.popleft()
        if failed:
            self.last_error = error

    def check(self, stats: SourceStats, end_of_epoch: bool = False) -> None:
        seen = len(self.outcomes)
        if not seen or (seen < self.window and not end_of_epoch):
            return
        if self.failed_in_window / seen <= self.max_fraction:
            return
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.reasons.items()))
        raise TooManyFailedRows(
            f"{self.failed_in_window} of the last {seen} rows had no usable hidden states, more than "
            f"--max-failed-fraction {self.max_fraction:g} (so far: {stats.invalid} invalid"
            f"{f' ({reasons})' if reasons else ''}, {stats.failed} failed, {stats.loaded} loaded). Last error: "
            f"{self.last_error}\nFix the cause (the reasons above; regenerate or delete bad files), or pass "
            "--max-failed-fraction 1 to skip such rows whatever their number."
        )


@dataclass
class SourceStats:
    loaded: int = 0
    missing: int = 0
    invalid: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    guard: FailedRows = field(default_factory=FailedRows)

    def to_dict(self) -> dict:
        return {
            "loaded": self.loaded,
            "missing": self.missing,
            "invalid": self.invalid,
            "failed": self.failed,
            "invalid_reasons": dict(self.reasons),
        }


def trainer_capture_spec(config: HiddenStatesConfig, verifier: Verifier) -> CaptureSpec:
    """What the server must capture for this run: `--target-layer-ids` by the rule `serve` uses."""
    return capture_spec(verifier.text_config.num_hidden_layers, config.target_layer_ids)


def build_source(
    config: HiddenStatesConfig, data_path: str, verifier: Verifier, hidden_size: int, device: torch.device
) -> HiddenSource:
    dtype = getattr(torch, config.dtype)
    spec = trainer_capture_spec(config, verifier)
    source: HiddenSource
    if config.colocated:
        source = _colocated_source(config, verifier, device)
    elif config.on_missing == "generate":
        from mtptune.serving.client import HiddenStatesClient

        client = HiddenStatesClient(
            endpoints=list(config.endpoints),
            model_id=verifier.name_or_path,
            num_layers=len(spec.layer_ids),
            hidden_size=hidden_size,
            on_generate=config.on_generate,
            cache_dir=config.cache_dir(data_path),
            request_timeout=config.request_timeout,
            max_retries=config.max_retries,
            concurrency=config.concurrency,
            api_key=config.api_key,
            server_wait_timeout=config.server_wait_timeout,
        )
        client.check_model()
        source = ServerSource(client, spec, config.prefetch, dtype, config.prefetch_tokens)
    else:
        if config.endpoints:
            log.warning(
                "--vllm-endpoint is ignored with --on-missing %s: rows are read only from %s.",
                config.on_missing,
                config.cache_dir(data_path),
            )
        source = FolderSource(config.cache_dir(data_path), config.on_missing, spec, hidden_size, dtype)
    if config.memory_cache_gib > 0:
        cache_device = config.memory_cache_device
        if cache_device == "auto":
            cache_device = device.type if config.colocated else "cpu"
        elif cache_device == "cuda" and device.type != "cuda":
            raise ConfigError(
                f"--hidden-states-memory-cache-device cuda: the trainer runs on {device} (--device), so the cache "
                "would not be on a GPU; pass --hidden-states-memory-cache-device cpu (or auto)."
            )
        cache = HiddenStateCache(int(config.memory_cache_gib * 2**30), device if cache_device == "cuda" else "cpu")
        source = CachedSource(source, cache)
    return source


def _colocated_source(config: HiddenStatesConfig, verifier: Verifier, device: torch.device) -> HiddenSource:
    from mtptune.serving.colocated import CPU_SHAPES, GPU_SHAPES, ColocatedSource, ForwardShapes
    from mtptune.serving.verifier_runtime import VerifierRuntime

    dtype = config.verifier_dtype
    if dtype == "auto" and device.type == "cuda":
        dtype = "bfloat16"
    runtime = VerifierRuntime.load(
        str(verifier.root),
        layer_ids=[verifier.text_config.num_hidden_layers],
        device=str(device),
        dtype=dtype,
        load_format=config.verifier_load_format,
        with_tokenizer=False,
    )
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if config.forward_tokens is not None:
        shapes = ForwardShapes(config.forward_tokens, shapes.width_step)
    return ColocatedSource(runtime, shapes)


def prefetch_depth(config: HiddenStatesConfig) -> int:
    return max(config.prefetch, COLOCATED_PREFETCH_ROWS) if config.colocated else config.prefetch


def prefetch(source: HiddenSource, rows: Iterable[Row], depth: int, max_tokens: int | None = None) -> Background:
    """`source.stream(rows)` in a background thread, at most `depth` rows and `max_tokens` of their tokens ahead of
    the consumer; yields each `(row, hidden states or exception)`, so that the consumer never builds a row again."""
    return Background(
        source.stream(rows), depth, "mtptune-prefetch", cost=lambda item: len(item[0]), max_cost=max_tokens
    )


def take_rows(
    prefetcher: Background, count: int, stats: SourceStats, on_missing: str, warn: Callable[[str], None]
) -> tuple[list[Row], list[torch.Tensor]]:
    """Pull the next `count` rows and their hidden states (in order) and keep the rows that have valid ones; count
    the others. An error that every row would hit stops the run at once (`STOPPING`, or an invalid file of another
    verifier), and so do too many failed rows (`FailedRows`): skipping would lose the samples, or all of them."""
    kept, hidden = [], []
    for _ in range(count):
        row, result = prefetcher.next()
        row_id = row.row_id
        if isinstance(result, STOPPING):
            raise result  # skipping would lose the sample; the trainer saves a checkpoint and stops
        if isinstance(result, HiddenStatesInvalid) and is_systematic(result):
            raise mismatch_failure(result, None) from result
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
            stats.guard.record(True, f"row {row_id}: {result}")
            continue
        if result.shape[0] != len(row):
            stats.invalid += 1
            warn(f"row {row_id}: {result.shape[0]} hidden-state rows for {len(row)} tokens; skipped")
            stats.guard.record(True, f"row {row_id}: {result.shape[0]} hidden-state rows for {len(row)} tokens")
            continue
        stats.loaded += 1
        stats.guard.record(False)
        kept.append(row)
        hidden.append(result)
    stats.guard.check(stats)
    return kept, hidden
