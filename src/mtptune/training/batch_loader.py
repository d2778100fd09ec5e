"""Micro-batches assembled off the training thread.

A background thread pulls each micro-batch's hidden states from the row prefetcher (`prefetch`), packs the rows
(`collate`), works out the supervised rows per step (`LossPlan`) and, on CUDA, builds flex attention's block masks
and pins the tensors. The training thread then only issues non-blocking host-to-device copies, so packing ~60 MB of
hidden states per 8192-token step, the masks and the copy no longer sit between two GPU steps. Errors (a lost
server, a bad file under `--on-missing raise`) reach the training thread at the micro-batch they belong to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mtptune.data.rows import PreparedRows
from mtptune.training.background import Background
from mtptune.training.batching import PackedBatch, collate
from mtptune.training.hidden_source import SourceStats, prefetch, take_rows


class BatchLoader:
    """Yields one `PackedBatch` (or None: no row of it had valid hidden states) per entry of `micro_batches`."""

    def __init__(
        self,
        source,
        rows: PreparedRows,
        micro_batches: Iterable[list[int]],
        *,
        prefetch_rows: int,
        prefetch_tokens: int | None = None,
        stats: SourceStats,
        on_missing: str,
        warn: Callable[[str], None],
        pad_to: int | None,
        num_steps: int,
        pin_memory: bool,
        block_masks: bool = False,
        depth: int = 2,
    ) -> None:
        micro = list(micro_batches)
        self._prefetcher = prefetch(source, (rows[i] for ids in micro for i in ids), prefetch_rows, prefetch_tokens)

        def assemble(ids: list[int]) -> PackedBatch | None:
            kept, hidden = take_rows(self._prefetcher, len(ids), stats, on_missing, warn)
            if not kept:
                return None
            batch = collate(kept, hidden, pad_to, num_steps)
            if block_masks:
                batch = batch.with_block_masks(num_steps)
            return batch.pin_memory() if pin_memory else batch

        self._batches = Background((assemble(ids) for ids in micro), depth, "mtptune-batches")

    @property
    def wait_seconds(self) -> float:
        """How long the training thread waited for a batch."""
        return self._batches.wait_seconds

    def next(self) -> PackedBatch | None:
        try:
            return self._batches.next()
        except StopIteration:
            raise RuntimeError("BatchLoader: asked for more micro-batches than it was given") from None

    def close(self) -> None:
        self._prefetcher.close()  # first: unblocks an assembly waiting on a row
        self._batches.close()
