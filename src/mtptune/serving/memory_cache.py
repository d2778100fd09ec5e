"""A bounded in-memory cache of hidden states, so that epochs after the first need no server and no files.

One entry per row: its layer-N residual `[T, H]`, kept on one device (host RAM, or spare GPU memory where the
trainer runs: then a cached row costs no copy at all). When a new entry would pass the byte budget, the least
recently used entries are dropped first. Keys are row ids of one run's prepared data; an entry is used only for
a row of the same length (a row id never changes its tokens within a run).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    evicted: int = 0
    too_large: int = 0  # entries larger than the whole budget, never stored


class HiddenStateCache:
    def __init__(self, capacity_bytes: int, device: torch.device | str = "cpu") -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = int(capacity_bytes)
        self.device = torch.device(device)
        self.bytes = 0
        self.counters = CacheStats()
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, row_id: int) -> bool:
        return row_id in self._entries

    def get(self, row_id: int, length: int | None = None) -> torch.Tensor | None:
        """The cached states of `row_id` (and of `length` tokens, when given), now the most recently used."""
        entry = self._entries.get(row_id)
        if entry is None or (length is not None and entry.shape[0] != length):
            self.counters.misses += 1
            return None
        self._entries.move_to_end(row_id)
        self.counters.hits += 1
        return entry

    def put(self, row_id: int, states: torch.Tensor) -> torch.Tensor:
        """Keep `states` (moved to the cache's device); returns the tensor to use from now on: the cached one, or
        `states` itself when it cannot be kept (larger than the whole budget)."""
        size = states.numel() * states.element_size()
        if size > self.capacity_bytes:
            self.counters.too_large += 1
            return states
        old = self._entries.pop(row_id, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        while self.bytes + size > self.capacity_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
            self.counters.evicted += 1
        kept = states.to(self.device, non_blocking=False).contiguous()
        self._entries[row_id] = kept
        self.bytes += size
        self.counters.stored += 1
        return kept

    def stats(self) -> dict:
        return {
            **asdict(self.counters),
            "entries": len(self._entries),
            "bytes": self.bytes,
            "capacity_bytes": self.capacity_bytes,
            "device": str(self.device),
        }
