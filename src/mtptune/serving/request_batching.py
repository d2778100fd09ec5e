"""Dynamic batching of hidden-state captures: requests that arrive within a short window share padded forwards.

Each forward is right-padded to its longest row (Gated DeltaNet cannot be packed: docs/contracts.md, "Verifier
forwards"), so the batcher groups requests of similar length: it sorts the waiting requests by length, splits them into
the runs that minimise padded tokens plus a fixed cost per forward (`plan_forwards`), each within the token budget, and
runs the run holding the oldest request (no request waits behind newer ones forever). A lone request over the budget
still runs (the max-length check bounds it). While the model is busy the queue simply fills, so under load forwards form
without waiting for the window at all; answering one run while the next computes keeps the clients' next requests
arriving. The window is also cut short once as many requests wait as were in demand when the previous batch was cut
(clients that keep N requests in flight send them back within a few ms of their answers; there is no point waiting the
rest of the window for an N+1st).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Result = TypeVar("Result")


class QueueFull(Exception):
    """The bounded request queue is full; the server answers 503 and the client backs off."""


@dataclass
class _Pending(Generic[Result]):
    token_ids: Sequence[int]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


# What one extra forward costs, in padded-token equivalents: a split is worth it only when it saves more padding than
# this. Every forward pays a fixed cost of launching its kernels from Python (docs/benchmarks.md, "Why the defaults are
# what they are"). Tunable per server (--batch-overhead-tokens).
FORWARD_OVERHEAD_TOKENS = 1024
# Requests considered per cut: enough to sort into well-filled runs, few enough that planning stays ~1 ms.
PLAN_POOL_REQUESTS = 256


def plan_forwards(
    lengths: Sequence[int],
    max_batch_tokens: int,
    overhead_tokens: int = FORWARD_OVERHEAD_TOKENS,
    max_rows: int | None = None,
) -> list[list[int]]:
    """Split requests (by index into `lengths`) into right-padded forwards of similar length.

    Minimises sum over forwards of (rows x longest row + overhead_tokens) over contiguous runs of the length-sorted
    order (optimal for that cost: an optimal grouping never interleaves lengths), with rows x longest <= the
    budget except for a lone longer request, and at most `max_rows` rows. Returns the runs shortest first, each
    listing indices shortest first.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sizes = [max(int(lengths[i]), 1) for i in order]
    n = len(sizes)
    best = [0] * (n + 1)  # best[j]: cost of the first j sorted requests
    cut_at = [0] * (n + 1)  # cut_at[j]: where the last run of that optimum starts
    for j in range(1, n + 1):
        longest = sizes[j - 1]  # sorted, so the run's last row is its longest
        rows_cap = max(1, max_batch_tokens // longest)
        if max_rows is not None:
            rows_cap = max(1, min(rows_cap, max_rows))
        best[j] = best[j - 1] + longest + overhead_tokens
        cut_at[j] = j - 1
        for start in range(max(0, j - rows_cap), j - 1):
            cost = best[start] + (j - start) * longest + overhead_tokens
            if cost < best[j]:
                best[j], cut_at[j] = cost, start
    runs: list[list[int]] = []
    j = n
    while j > 0:
        runs.append(order[cut_at[j] : j])
        j = cut_at[j]
    return runs[::-1]


class _BatchLoop:
    """What both batchers share: a background task woken by an event that waits a short window for requests to
    join, cuts a batch, runs it on the executor and resolves each request's future; on stop every pending request
    fails. Subclasses decide the waiting, the cut, the inputs and the bookkeeping (the hooks below)."""

    _task_name = "batcher"
    _queue: deque | list
    _wakeup: asyncio.Event | None
    _task: asyncio.Task | None

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self._task_name)

    # What each batcher decides (hooks of the shared loop below).
    def _worth_waiting(self) -> bool:  # wait out the window for more requests?
        raise NotImplementedError

    def _cut(self) -> list:  # take the next batch from the queue
        raise NotImplementedError

    def _inputs(self, batch: list):  # what run_batch gets
        raise NotImplementedError

    def _started(self, batch: list) -> None: ...

    def _finished(self, batch: list, seconds: float | None) -> None: ...  # seconds None: the batch failed

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Give concurrent requests a moment to join, unless nothing more is worth waiting for.
            deadline = self._queue[0].enqueued + self.window_s
            while self._worth_waiting() and (wait := deadline - time.perf_counter()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    break
            batch = self._cut()
            if not batch:
                continue
            self._started(batch)
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, self._inputs(batch))
            except Exception as exc:  # one failure fails the batch's requests, never the loop
                log.exception("%s: batch of %d requests failed", self._task_name, len(batch))
                self._finished(batch, None)
                for item in batch:
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(exc)
                continue
            self._finished(batch, time.perf_counter() - start)
            for item, result in zip(batch, results):
                if item.future is not None and not item.future.done():
                    item.future.set_result(result)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for pending in self._queue:
            if pending.future is not None and not pending.future.done():
                pending.future.set_exception(RuntimeError("server shutting down"))
        self._queue.clear()


class DynamicBatcher(_BatchLoop, Generic[Result]):
    """Feeds `run_batch(list of token-id sequences) -> list of results` (run on `executor`) in padded batches.

    `on_batch(rows, tokens, padded_tokens, seconds)` is called after each forward and `on_start(queue waits in
    seconds)` as it starts (metrics)."""

    _task_name = "hidden-states-batcher"

    def __init__(
        self,
        run_batch: Callable[[list[Sequence[int]]], list[Result]],
        executor: Executor,
        max_batch_tokens: int,
        window_s: float = 0.002,
        max_queue: int = 1024,
        on_batch: Callable[[int, int, int, float], None] | None = None,
        on_start: Callable[[list[float]], None] | None = None,
        overhead_tokens: int = FORWARD_OVERHEAD_TOKENS,
        max_rows: int | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_tokens = max_batch_tokens
        self.overhead_tokens = overhead_tokens
        self.max_rows = max_rows
        self.window_s = window_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_start = on_start
        self._queue: deque[_Pending[Result]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # Requests waiting when the previous batch was cut (its rows + those left queued): the demand that a
        # forming batch can expect to see again. 0 = unknown (wait the window).
        self.expected = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, token_ids: Sequence[int]) -> Result:
        if self._wakeup is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests already queued (limit {self.max_queue})")
        pending: _Pending[Result] = _Pending(token_ids, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wakeup.set()
        return await pending.future

    def _cut(self) -> list[_Pending[Result]]:
        """The length-sorted run (see `plan_forwards`) that holds the oldest waiting request."""
        while self._queue and self._queue[0].future.cancelled():  # client went away before its turn
            self._queue.popleft()
        if not self._queue:
            return []
        pool: list[_Pending[Result]] = []
        pool_tokens = 0
        for pending in self._queue:  # the oldest requests, up to a few forwards' worth
            if len(pool) >= PLAN_POOL_REQUESTS or (pool and pool_tokens >= 4 * self.max_batch_tokens):
                break
            if not pending.future.cancelled():
                pool.append(pending)
                pool_tokens += len(pending.token_ids)
        runs = plan_forwards(
            [len(p.token_ids) for p in pool], self.max_batch_tokens, self.overhead_tokens, self.max_rows
        )
        chosen = next(run for run in runs if 0 in run)  # pool[0] is the oldest
        batch = [pool[i] for i in chosen]
        taken = {id(p) for p in batch}
        self._queue = deque(p for p in self._queue if id(p) not in taken and not p.future.cancelled())
        return batch

    def _room_left(self) -> bool:
        if self.max_rows is not None and len(self._queue) >= self.max_rows:
            return False
        width = max((len(p.token_ids) for p in self._queue), default=0)
        return width * (len(self._queue) + 1) <= self.max_batch_tokens

    def _worth_waiting(self) -> bool:
        """The batch has room and fewer requests wait than the last batch saw in demand."""
        return self._room_left() and (not self.expected or len(self._queue) < self.expected)

    def _inputs(self, batch: list[_Pending[Result]]) -> list[Sequence[int]]:
        return [p.token_ids for p in batch]

    def _started(self, batch: list[_Pending[Result]]) -> None:
        self.expected = len(batch) + len(self._queue)
        if self.on_start is not None:
            now = time.perf_counter()
            self.on_start([now - p.enqueued for p in batch])

    def _finished(self, batch: list[_Pending[Result]], seconds: float | None) -> None:
        if self.on_batch is not None and seconds is not None:
            lengths = [len(p.token_ids) for p in batch]
            self.on_batch(len(batch), sum(lengths), len(batch) * max(lengths), seconds)


@dataclass
class GenerationRequest:
    """One generation request as the generation batcher queues it."""

    token_ids: Sequence[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    future: asyncio.Future | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def abandoned(self) -> bool:
        """Its client has gone (the awaiting task was cancelled); read from the model thread once per token."""
        return self.future is not None and self.future.cancelled()

    @property
    def group(self) -> tuple:
        """Requests of one group can share a decode: all greedy ones, or sampled ones with the same temperature and
        top_p. A seeded sampled request runs alone so that its seed alone decides its tokens (reproducibility)."""
        if self.temperature <= 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sampled", self.temperature, self.top_p)


class GenerationBatcher(_BatchLoop, Generic[Result]):
    """Batches concurrent generation requests into one padded decode (`run_batch(requests) -> results`).

    Static batching: a batch is cut from the queue's first request plus every queued request of the same sampling
    group, in arrival order, up to `max_rows` rows and `max_batch_tokens` padded slots (rows × (longest prompt +
    largest max_tokens)). Requests arriving while a batch decodes wait for the next one.
    """

    _task_name = "generation-batcher"

    def __init__(
        self,
        run_batch: Callable[[list[GenerationRequest]], list[Result]],
        executor: Executor,
        max_rows: int,
        max_batch_tokens: int,
        window_s: float = 0.02,
        max_queue: int = 1024,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.executor = executor
        self.max_rows = max(1, max_rows)
        self.max_batch_tokens = max_batch_tokens
        self.window_s = window_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.running = 0
        self._queue: list[GenerationRequest] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return len(self._queue) + self.running

    async def submit(self, request: GenerationRequest) -> Result:
        if self._wakeup is None:
            raise RuntimeError("GenerationBatcher.start() was not called")
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.depth} generation requests already queued (limit {self.max_queue})")
        request.future = asyncio.get_running_loop().create_future()
        self._queue.append(request)
        self._wakeup.set()
        return await request.future

    @staticmethod
    def _slots(batch: list[GenerationRequest]) -> int:
        return len(batch) * (max(len(r.token_ids) for r in batch) + max(r.max_tokens for r in batch))

    def _cut(self) -> list[GenerationRequest]:
        self._queue = [r for r in self._queue if r.future is not None and not r.future.cancelled()]
        if not self._queue:
            return []
        group = self._queue[0].group
        batch: list[GenerationRequest] = []
        for request in self._queue:
            if len(batch) >= self.max_rows:
                break
            if request.group != group:
                continue
            if batch and self._slots([*batch, request]) > self.max_batch_tokens:
                continue
            batch.append(request)
        taken = {id(r) for r in batch}
        self._queue = [r for r in self._queue if id(r) not in taken]
        return batch

    def _worth_waiting(self) -> bool:
        return len(self._queue) < self.max_rows  # generation takes far longer than the window

    def _inputs(self, batch: list[GenerationRequest]) -> list[GenerationRequest]:
        return batch

    def _started(self, batch: list[GenerationRequest]) -> None:
        self.running = len(batch)

    def _finished(self, batch: list[GenerationRequest], seconds: float | None) -> None:
        self.running = 0
        if self.on_batch is not None and seconds is not None:
            self.on_batch(len(batch), self._slots(batch), seconds)
