"""GenerationBatcher: concurrent generation requests of one sampling group share one decode call."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from mtptune.serving.request_batching import GenerationBatcher, GenerationRequest


def run_requests(requests: list[GenerationRequest], max_rows: int = 32) -> tuple[list[list[int]], list[str]]:
    calls: list[list[int]] = []

    def run_batch(batch: list[GenerationRequest]) -> list[str]:
        calls.append([int(r.token_ids[0]) for r in batch])
        return [f"out{r.token_ids[0]}" for r in batch]

    async def main() -> list[str]:
        with ThreadPoolExecutor(1) as executor:
            batcher: GenerationBatcher[str] = GenerationBatcher(
                run_batch, executor, max_rows=max_rows, max_batch_tokens=10_000, window_s=0.05
            )
            batcher.start()
            try:
                return list(await asyncio.gather(*(batcher.submit(r) for r in requests)))
            finally:
                await batcher.stop()

    return calls, asyncio.run(main())


def test_greedy_requests_share_a_decode_and_get_their_own_results() -> None:
    calls, results = run_requests([GenerationRequest([i], 8, 0.0, 1.0, None) for i in range(5)])
    assert calls == [[0, 1, 2, 3, 4]]
    assert results == [f"out{i}" for i in range(5)]


def test_groups_by_sampling_parameters_seeded_alone_and_row_cap() -> None:
    requests = [
        GenerationRequest([0], 8, 0.0, 1.0, None),
        GenerationRequest([1], 8, 0.7, 0.9, None),
        GenerationRequest([2], 8, 0.0, 1.0, None),
        GenerationRequest([3], 8, 0.7, 0.9, 5),
        GenerationRequest([4], 8, 0.7, 0.9, None),
        GenerationRequest([5], 8, 0.0, 1.0, None),
    ]
    calls, results = run_requests(requests, max_rows=2)
    assert sorted(map(sorted, calls)) == [[0, 2], [1, 4], [3], [5]]
    assert results == [f"out{i}" for i in range(6)]
