"""Colocated hidden states: the verifier's forward in the trainer's own process, on the trainer's device.

No HTTP, no files: `ColocatedSource` runs the same `VerifierRuntime` the built-in server runs and hands each row's
layer-N residual to the trainer as a device tensor. Under torchrun every rank holds its own verifier replica and
computes the rows of its own micro-batches.

Forwards have fixed shapes (`ForwardShapes`): every forward is `rows x width` tokens with the width rounded up to a
multiple of `width_step` and `rows = tokens // width`, so a run meets only a handful of shapes. On a GPU that is what
keeps start-up short: flash-linear-attention autotunes its kernels per batch size and per token-block count, and Triton
compiles again for new kinds of lengths, seconds for each new shape. Rows are grouped by width within a window of the
incoming rows; a partly filled group moves up to the next width (more padding, same shapes), and the stream's last
forward is padded with dummy rows. Rows are answered in input order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from mtptune.data.rows import Row
from mtptune.serving.verifier_runtime import VerifierRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardShapes:
    tokens: int  # tokens of one forward (rows x width, rounded down)
    width_step: int  # widths are multiples of this

    def width_for(self, length: int) -> int:
        return -(-max(length, 1) // self.width_step) * self.width_step

    def rows_for(self, width: int) -> int:
        return max(1, self.tokens // width)


GPU_SHAPES = ForwardShapes(tokens=16384, width_step=32)
CPU_SHAPES = ForwardShapes(tokens=2048, width_step=16)
# Rows are grouped by width within a window of this many forwards' tokens: a wider window fills forwards better,
# finer width steps too but with more shapes (docs/benchmarks.md, "Why the defaults are what they are").
WINDOW_FORWARDS = 16


def plan_fixed_forwards(
    lengths: list[int], shapes: ForwardShapes, final: bool
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Group rows (indices into `lengths`) into full forwards `(width, indices)`; rows left over are returned to
    wait for more rows, or, when `final`, go into one last forward (the caller pads it with dummy rows)."""
    by_width: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_width.setdefault(shapes.width_for(n), []).append(i)
    forwards: list[tuple[int, list[int]]] = []
    carry: list[int] = []
    for width in sorted(by_width):
        members = carry + by_width[width]  # carried rows are shorter: they fit this width too
        rows = shapes.rows_for(width)
        while len(members) >= rows:
            forwards.append((width, members[:rows]))
            members = members[rows:]
        carry = members
    if carry and final:
        width = max(shapes.width_for(lengths[i]) for i in carry)
        for start in range(0, len(carry), shapes.rows_for(width)):
            forwards.append((width, carry[start : start + shapes.rows_for(width)]))
        carry = []
    return forwards, carry


@dataclass
class ColocatedStats:
    forwards: int = 0
    rows: int = 0
    tokens: int = 0  # real tokens
    padded_tokens: int = 0  # tokens computed, padding and dummy rows included
    seconds: float = 0.0  # wall time of this source's forwards (the device work they wait for included)


class ColocatedSource:
    def __init__(
        self, runtime: VerifierRuntime, shapes: ForwardShapes | None = None, window_forwards: int = WINDOW_FORWARDS
    ) -> None:
        self.runtime = runtime
        self.shapes = shapes or (GPU_SHAPES if runtime.device.type == "cuda" else CPU_SHAPES)
        self.window_tokens = window_forwards * self.shapes.tokens
        self.counters = ColocatedStats()

    def stream(self, rows: Iterable[Row]) -> Iterator[tuple[Row, torch.Tensor]]:
        pending: deque[Row] = deque()  # received, not yet answered, in input order
        unplanned: list[Row] = []  # received, not yet in a forward
        done: dict[int, torch.Tensor] = {}  # id(row) -> its states
        unplanned_tokens = 0
        for row in rows:
            pending.append(row)
            unplanned.append(row)
            unplanned_tokens += len(row)
            if unplanned_tokens >= self.window_tokens:
                unplanned = self._run(unplanned, done, final=False)
                unplanned_tokens = sum(len(r) for r in unplanned)
                while pending and id(pending[0]) in done:
                    row = pending.popleft()
                    yield row, done.pop(id(row))
        self._run(unplanned, done, final=True)
        while pending:
            row = pending.popleft()
            yield row, done.pop(id(row))

    def _run(self, rows: list[Row], done: dict[int, torch.Tensor], final: bool) -> list[Row]:
        forwards, left = plan_fixed_forwards([len(r) for r in rows], self.shapes, final)
        for width, members in forwards:
            sequences = [rows[i].input_ids.tolist() for i in members]
            dummy = self.shapes.rows_for(width) - len(members)
            padded = sequences + [[0] * width] * dummy  # the fixed row count: dummy rows are computed, unused
            padded[0] = padded[0] + [0] * (width - len(padded[0]))  # the fixed width (right padding is exact)
            start = time.perf_counter()
            states = self.runtime.residuals(padded, keep=[len(s) for s in sequences])
            self.counters.seconds += time.perf_counter() - start
            for i, state in zip(members, states):
                done[id(rows[i])] = state
            self.counters.forwards += 1
            self.counters.rows += len(members)
            self.counters.tokens += sum(len(s) for s in sequences)
            self.counters.padded_tokens += width * len(padded)
        return [rows[i] for i in left]

    def stats(self) -> dict:
        c = self.counters
        return {
            "colocated": {
                "forwards": c.forwards,
                "rows": c.rows,
                "tokens": c.tokens,
                "padded_tokens": c.padded_tokens,
                "seconds": round(c.seconds, 3),
                "forward_tokens": self.shapes.tokens,
            }
        }

    def close(self) -> None:
        pass
