"""Capture forwards of similar length: the planner, the batcher that uses it, and the runtime's padded forward."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mtptune.serving.batching import DynamicBatcher, plan_forwards
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


def test_pipelined_batcher_launches_the_next_batch_while_one_finishes_and_isolates_failures() -> None:
    """With finish_batch, batch n+1 is launched before batch n's results are in, never more than max_in_flight at
    once; a batch whose finish fails fails only its own requests."""
    events: list[str] = []
    release = {i: threading.Event() for i in range(4)}

    def launch(batch: list[list[int]]) -> tuple[int, list[int]]:
        index = sum(e.startswith("launch") for e in events)
        events.append(f"launch {index}")
        return index, [len(s) for s in batch]

    def finish(launched: tuple[int, list[int]]) -> list[int]:
        index, lengths = launched
        assert release[index].wait(5)
        events.append(f"finish {index}")
        if index == 1:
            raise RuntimeError("device lost batch 1")
        return lengths

    async def scenario() -> list:
        with ThreadPoolExecutor(1) as model, ThreadPoolExecutor(1) as done:
            batcher: DynamicBatcher[int] = DynamicBatcher(
                launch, model, max_batch_tokens=1 << 20, window_s=0.01, max_rows=1,
                finish_batch=finish, finish_executor=done, max_in_flight=2,
            )  # fmt: skip
            batcher.start()
            tasks = [asyncio.create_task(batcher.submit([1] * n)) for n in (10, 20, 30)]
            await asyncio.sleep(0.3)
            in_flight = list(events)  # two launched, none finished, the third held back
            for i in range(3):
                release[i].set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await batcher.stop()
        return [in_flight, results]

    in_flight, results = asyncio.run(scenario())
    assert in_flight == ["launch 0", "launch 1"]
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], RuntimeError) and "batch 1" in str(results[1])
    assert events.index("launch 2") > events.index("finish 0")


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
    pending = runtime_fp32.issue_capture([prompt])  # the server's launch / finish halves of the same capture
    torch.testing.assert_close(pending.result()[0].hidden_states, before.hidden_states, atol=0, rtol=0)
    after = runtime_fp32.capture([prompt])[0]
    torch.testing.assert_close(after.hidden_states, before.hidden_states, atol=0, rtol=0)
