"""Micro-batches assembled off the training thread.

A background thread pulls each micro-batch's hidden states from the `Prefetcher`, packs the rows (`collate`),
works out the supervised rows per step (`LossPlan`) and, on CUDA, pins the tensors. The training thread then only
issues non-blocking host-to-device copies, so packing ~60 MB of hidden states per 8192-token step and the copy
itself no longer sit between two GPU steps. Errors (a lost server, a bad file under `--on-missing raise`) reach
the training thread at the micro-batch they belong to.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable

from mtptune.training.batching import PackedBatch, PreparedRows, collate
from mtptune.training.hidden_source import Prefetcher, SourceStats, take_rows

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BatchLoader:
    """Yields one `PackedBatch` (or None: no row of it had valid hidden states) per entry of `micro_batches`."""

    def __init__(
        self,
        source,
        rows: PreparedRows,
        micro_batches: Iterable[list[int]],
        *,
        prefetch_rows: int,
        stats: SourceStats,
        on_missing: str,
        warn: Callable[[str], None],
        pad_to: int | None,
        num_steps: int,
        pin_memory: bool,
        depth: int = 2,
    ) -> None:
        self._micro = list(micro_batches)
        self._prefetcher = Prefetcher(source, (rows[i] for ids in self._micro for i in ids), prefetch_rows)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_seconds = 0.0  # how long the training thread waited for a batch

        def assemble(ids: list[int]) -> PackedBatch | None:
            kept, hidden = take_rows(self._prefetcher, [rows[i] for i in ids], stats, on_missing, warn)
            if not kept:
                return None
            batch = collate(kept, hidden, pad_to, num_steps)
            return batch.pin_memory() if pin_memory else batch

        self._thread = threading.Thread(target=self._run, args=(assemble,), daemon=True, name="mtptune-batches")
        self._thread.start()

    def _run(self, assemble: Callable[[list[int]], PackedBatch | None]) -> None:
        try:
            for ids in self._micro:
                if not self._put(assemble(ids)):
                    return
        except BaseException as exc:  # re-raised in the training thread
            self._put(_Failure(exc))
            return
        self._put(_END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> PackedBatch | None:
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, _Failure):
            raise item.exc
        if item is _END:
            raise RuntimeError("BatchLoader: asked for more micro-batches than it was given")
        return item

    def close(self) -> None:
        self._stop.set()
        self._prefetcher.close()
        self._thread.join(timeout=5.0)
