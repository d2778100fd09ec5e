"""An iterator run ahead in a daemon thread, for the trainer's fetch and batch-assembly stages."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable

_END = object()


class BackgroundClosed(RuntimeError):
    """`next()` after (or while) the background iterator was closed."""


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Background:
    """Consume `items` in a thread, at most `depth` items ahead of `next()`, and, with `cost`, at most `max_cost` of
    their summed cost (an item costlier than that alone still goes through, one at a time).

    An exception raised by `items` reaches the consumer at the item where it happened; `next()` raises
    StopIteration at the end. `wait_seconds` is how long the consumer waited: the wait fraction the trainer reports.
    """

    def __init__(
        self,
        items: Iterable,
        depth: int,
        name: str,
        cost: Callable[[object], int] | None = None,
        max_cost: int | None = None,
    ) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._cost, self._max_cost = cost, max_cost
        self._queued_cost = 0
        self._room = threading.Condition()  # signalled when the consumer takes an item
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name=name)
        self._thread.start()

    @property
    def queued_cost(self) -> int:
        return self._queued_cost

    def _run(self, items: Iterable) -> None:
        try:
            for item in items:
                if not self._put(item, self._cost(item) if self._cost is not None else 0):
                    return
        except BaseException as exc:  # re-raised in the consumer's thread
            self._put(_Failure(exc), 0)
            return
        self._put(_END, 0)

    def _put(self, item, cost: int) -> bool:
        with self._room:
            while self._max_cost is not None and self._queued_cost and self._queued_cost + cost > self._max_cost:
                if self._stop.is_set():
                    return False
                self._room.wait(timeout=0.1)
            self._queued_cost += cost
        while not self._stop.is_set():
            try:
                self._queue.put((item, cost), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self):
        start = time.perf_counter()
        while True:
            try:
                item, cost = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set():
                    raise BackgroundClosed(f"{self._thread.name} was closed") from None
        if cost:
            with self._room:
                self._queued_cost -= cost
                self._room.notify()
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, _Failure):
            raise item.exc
        if item is _END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
