"""Capture forwards of similar length: the planner, the batcher that uses it, and the runtime's padded forward."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mtptune.serving.request_batching import DynamicBatcher, plan_forwards
from mtptune.serving.verifier_runtime import VerifierRuntime


def padded(lengths: list[int], runs: list[list[int]]) -> int:
    return sum(len(run) * max(lengths[i] for i in run) for run in runs)


def test_plan_covers_every_request_once_within_the_budget() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(100, 1500) for _ in range(64)]
    runs = plan_forwards(lengths, max_batch_tokens=16384)
    assert sorted(i for run in runs for i in run) == list(range(64))
    for run in runs:
        assert len(run) * max(lengths[i] for i in run) <= 16384
        assert [lengths[i] for i in run] == sorted(lengths[i] for i in run)


def test_plan_pads_far_less_than_arrival_order() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(100, 1500) for _ in range(32)]
    runs = plan_forwards(lengths, max_batch_tokens=16384)
    waste = padded(lengths, runs) / sum(lengths) - 1
    arrival_waste = 32 * max(lengths) / sum(lengths) - 1  # one forward padded to the longest
    assert waste < 0.15 and arrival_waste > 0.6
    assert len(runs) <= 6  # ...without degenerating into one forward per request


def test_plan_keeps_equal_lengths_in_one_forward_and_lone_long_requests_alone() -> None:
    assert plan_forwards([500] * 32, max_batch_tokens=16384) == [list(range(32))]
    assert plan_forwards([500] * 40, max_batch_tokens=16384) == [list(range(8)), list(range(8, 40))]
    assert plan_forwards([20000, 10], max_batch_tokens=16384) == [[1], [0]]
    assert plan_forwards([], max_batch_tokens=16384) == []


def test_plan_splits_only_when_padding_saved_beats_the_forward_overhead() -> None:
    assert plan_forwards([100, 100, 120], 16384, overhead_tokens=512) == [[0, 1, 2]]
    assert plan_forwards([100, 100, 1500], 16384, overhead_tokens=512) == [[0, 1], [2]]
    assert plan_forwards([100, 100, 350], 16384, overhead_tokens=512) == [[0, 1, 2]]  # a split saves 500 < 512


def test_plan_caps_rows_per_forward() -> None:
    runs = plan_forwards([100] * 10, 16384, overhead_tokens=512, max_rows=4)
    assert sorted(len(run) for run in runs) == [2, 4, 4]
    assert sorted(i for run in runs for i in run) == list(range(10))
    assert plan_forwards([100] * 10, 16384, max_rows=64) == [list(range(10))]


def test_batcher_never_exceeds_max_rows() -> None:
    seen: list[int] = []

    def run_batch(batch: list[list[int]]) -> list[int]:
        seen.append(len(batch))
        return [len(s) for s in batch]

    async def scenario() -> list[int]:
        with ThreadPoolExecutor(1) as executor:
            batcher: DynamicBatcher[int] = DynamicBatcher(
                run_batch, executor, max_batch_tokens=1 << 20, window_s=0.05, max_rows=3
            )
            batcher.start()
            results = await asyncio.gather(*(batcher.submit([1] * 50) for _ in range(8)))
            await batcher.stop()
        return list(results)

    assert asyncio.run(scenario()) == [50] * 8
    assert max(seen) <= 3 and sum(seen) == 8


def test_batcher_runs_the_oldest_request_first_with_its_length_neighbours() -> None:
    seen: list[list[int]] = []

    def run_batch(batch: list[list[int]]) -> list[int]:
        seen.append([len(s) for s in batch])
        return [len(s) for s in batch]

    async def scenario() -> list[int]:
        with ThreadPoolExecutor(1) as executor:
            batcher: DynamicBatcher[int] = DynamicBatcher(run_batch, executor, max_batch_tokens=4096, window_s=0.05)
            batcher.start()
            lengths = [900, 100, 880, 110, 905, 95, 120, 890]  # oldest first
            tasks = [asyncio.create_task(batcher.submit([1] * n)) for n in lengths]
            results = await asyncio.gather(*tasks)
            await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert results == [900, 100, 880, 110, 905, 95, 120, 890]  # every request got its own result back
    assert seen == [[880, 890, 900, 905], [95, 100, 110, 120]]  # the oldest (900) goes first, with its peers


@pytest.fixture(scope="module")
def runtime_fp32(tiny_verifier: Path) -> VerifierRuntime:
    return VerifierRuntime.load(str(tiny_verifier), [1, 4], device="cpu", dtype="float32")


def test_right_padded_capture_equals_one_request_at_a_time(runtime_fp32: VerifierRuntime) -> None:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 999, (n,), generator=gen).tolist() for n in (3, 70, 41, 128, 1)]
    batched = runtime_fp32.capture(prompts)
    for ids, got in zip(prompts, batched):
        alone = runtime_fp32.capture([ids])[0]
        assert got.hidden_states.shape == (len(ids), 2, 64)
        torch.testing.assert_close(got.hidden_states, alone.hidden_states, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.next_token_logits, alone.next_token_logits, atol=1e-4, rtol=1e-4)


def test_kernel_warm_up_runs_every_batch_size_and_leaves_captures_exact(runtime_fp32: VerifierRuntime) -> None:
    prompt = list(range(5, 40))
    before = runtime_fp32.capture([prompt])[0]
    shapes: list[tuple[int, int]] = []
    hook = runtime_fp32.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        runtime_fp32.warm_up_batch_sizes(3, widths=(8, 9), max_tokens=50, token_block=16)
    finally:
        hook.remove()
    # every row count at both widths, then one forward per 16-token block count 2..3 (32 and 48 tokens)
    assert shapes == [(1, 8), (1, 9), (2, 8), (2, 9), (3, 8), (3, 9), (3, 10), (3, 16)]
    after = runtime_fp32.capture([prompt])[0]
    torch.testing.assert_close(after.hidden_states, before.hidden_states, atol=0, rtol=0)
