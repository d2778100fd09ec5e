"""The measured dense matmul rate every benchmark's compute floor is divided by."""

from __future__ import annotations

import statistics
import time

import torch


def matmul_rate(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16, reps: int = 10) -> float:
    """Measured dense matmul FLOP/s (n^3, median of `reps` after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times)
