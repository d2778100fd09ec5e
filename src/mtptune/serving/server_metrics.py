"""Prometheus text exposition for the built-in server (`GET /metrics`), without a client-library dependency."""

from __future__ import annotations

import gc
import threading
import time
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "mtptune"


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.total}"]
        return out


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], int], max_batch_tokens: int | None = None) -> None:
        self._lock = threading.Lock()
        self._queue_depth = queue_depth
        self.max_batch_tokens = max_batch_tokens
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.hidden_state_files = 0
        self.file_write_failures = 0  # capture files that could not be written (their partial file is removed)
        self.abandoned_requests = 0  # clients that disconnected before their answer (their work was cancelled)
        self.batches = 0
        self.batched_requests = 0
        self.batched_tokens = 0
        self.padded_tokens = 0
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.forward = Histogram()
        self.queue_wait = Histogram()  # capture request: enqueued -> its forward starts
        self.file_write = Histogram()  # capture request: forward done -> its hidden-state file written
        # Python's cyclic GC stops every thread, the one launching the verifier's kernels included.
        self.gc_pause: dict[int, Histogram] = defaultdict(Histogram)
        self._gc_started = 0.0

    def watch_gc(self) -> None:
        """Time every garbage collection of this process into `gc_pause_seconds` (until `unwatch_gc`)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        # Runs inside the collector (GIL held, no other thread runs): no lock, no allocation-heavy work.
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pause[info["generation"]].observe(time.perf_counter() - self._gc_started)

    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency[endpoint].observe(seconds)

    def record_tokens(self, prompt: int, generated: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def record_file(self, seconds_after_forward: float) -> None:
        with self._lock:
            self.hidden_state_files += 1
            self.file_write.observe(seconds_after_forward)

    def record_file_failure(self) -> None:
        with self._lock:
            self.file_write_failures += 1

    def record_abandoned(self) -> None:
        with self._lock:
            self.abandoned_requests += 1

    def record_queue_waits(self, seconds: list[float]) -> None:
        with self._lock:
            for value in seconds:
                self.queue_wait.observe(value)

    def record_batch(self, size: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.batched_requests += size
            self.batched_tokens += tokens
            self.padded_tokens += padded_tokens
            self.forward.observe(seconds)

    def render(self) -> str:
        p = PREFIX
        with self._lock:
            lines = [
                f"# HELP {p}_requests_total HTTP requests by endpoint and status.",
                f"# TYPE {p}_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            counters = [
                ("prompt_tokens_total", "Prompt tokens processed.", self.prompt_tokens),
                ("generation_tokens_total", "Tokens generated.", self.generation_tokens),
                ("hidden_state_files_total", "Hidden-state files written.", self.hidden_state_files),
                ("file_write_failures_total", "Hidden-state files that failed to write.", self.file_write_failures),
                (
                    "abandoned_requests_total",
                    "Requests whose client disconnected before the answer (work cancelled).",
                    self.abandoned_requests,
                ),
                ("batches_total", "Capture forwards run.", self.batches),
                ("batched_requests_total", "Requests served by capture forwards.", self.batched_requests),
                ("batched_tokens_total", "Prompt tokens in capture forwards (padding excluded).", self.batched_tokens),
                ("padded_tokens_total", "Token slots (incl. padding) in capture forwards.", self.padded_tokens),
            ]
            for name, help_text, value in counters:
                lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} counter", f"{p}_{name} {value}"]
            lines += [
                f"# HELP {p}_queue_depth Capture requests waiting for a forward.",
                f"# TYPE {p}_queue_depth gauge",
                f"{p}_queue_depth {self._queue_depth()}",
            ]
            if self.max_batch_tokens is not None:
                lines += [
                    f"# HELP {p}_max_batch_tokens Padded-token budget of one capture forward.",
                    f"# TYPE {p}_max_batch_tokens gauge",
                    f"{p}_max_batch_tokens {self.max_batch_tokens}",
                ]
            lines += [
                f"# HELP {p}_request_latency_seconds End-to-end request latency.",
                f"# TYPE {p}_request_latency_seconds histogram",
            ]
            for endpoint, hist in sorted(self.latency.items()):
                lines += hist.lines(f"{p}_request_latency_seconds", f'endpoint="{endpoint}"')
            lines += [
                f"# HELP {p}_forward_seconds Capture forward time per batch.",
                f"# TYPE {p}_forward_seconds histogram",
                *self.forward.lines(f"{p}_forward_seconds"),
                f"# HELP {p}_queue_wait_seconds Capture request: time queued before its forward started.",
                f"# TYPE {p}_queue_wait_seconds histogram",
                *self.queue_wait.lines(f"{p}_queue_wait_seconds"),
                f"# HELP {p}_file_write_seconds Capture request: forward done to hidden-state file written.",
                f"# TYPE {p}_file_write_seconds histogram",
                *self.file_write.lines(f"{p}_file_write_seconds"),
                f"# HELP {p}_gc_pause_seconds Python garbage collections of the server process, by generation.",
                f"# TYPE {p}_gc_pause_seconds histogram",
            ]
            for generation, hist in sorted(self.gc_pause.items()):
                lines += hist.lines(f"{p}_gc_pause_seconds", f'generation="{generation}"')
        return "\n".join(lines) + "\n"
