"""The trainer's background stages (`training/background.py`) bound what they hold ahead: items and their cost."""

from __future__ import annotations

import time

from mtptune.training.background import Background

COSTS = [3, 3, 3, 9, 3, 3]


def _drain(stage: Background) -> tuple[list[int], int]:
    """Consume slowly (as a training step does), noting the most cost the stage held ahead at any sample."""
    got, peak = [], 0
    try:
        time.sleep(0.3)  # the producer runs as far ahead as it may
        while True:
            peak = max(peak, stage.queued_cost)
            try:
                got.append(stage.next())
            except StopIteration:
                return got, peak
            time.sleep(0.02)
    finally:
        stage.close()


def test_items_ahead_are_bounded_by_their_summed_cost():
    got, peak = _drain(Background(iter(COSTS), depth=10, name="test-stage", cost=lambda c: c, max_cost=6))
    assert got == COSTS  # order kept, nothing lost; the 9 (over the bound alone) went through by itself
    assert 6 <= peak <= 9
    unbounded, peak = _drain(Background(iter(COSTS), depth=10, name="test-stage", cost=lambda c: c))
    assert unbounded == COSTS and peak == sum(COSTS)


def test_without_a_cost_only_the_depth_bounds():
    stage = Background(iter(range(5)), depth=2, name="test-stage")
    try:
        time.sleep(0.2)
        assert stage._queue.qsize() <= 2
        assert [stage.next() for _ in range(5)] == list(range(5))
    finally:
        stage.close()
