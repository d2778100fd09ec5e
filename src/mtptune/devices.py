"""The one place a device name from a flag (`--device`, `--validate-device`) becomes a torch device: `auto` picks the
GPU when there is one, and a device this machine lacks is a ConfigError naming the flag, not a traceback from
deep inside torch."""

from __future__ import annotations

import logging

import torch

from mtptune.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str | None, flag: str = "--device", local_rank: int | None = None) -> torch.device:
    """`name` ("auto", "cpu", "cuda", "cuda:1", ...) as a torch device. `local_rank` (torchrun) picks the GPU for
    "auto" and a bare "cuda"."""
    if name in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"{flag} {name!r} is not a device (cpu, cuda, cuda:N, auto): {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {name}: no CUDA device is available here (use {flag} cpu).")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
            )
    return device


def warn_if_slow_cpu_dtype(device: torch.device, dtype: torch.dtype, what: str) -> None:
    """Say so when a model is about to run in bf16/fp16 on a CPU without native 16-bit matmuls (no AVX512-BF16 or
    AMX): there torch emulates them, ~50x slower than float32 on a 2-core AVX2 EPYC (docs/benchmarks.md)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return
    log.warning(
        "%s runs in %s on a CPU without native 16-bit matmuls (%s): expect it to be tens of times slower than "
        "float32; pass --dtype float32 (train --colocated: --verifier-dtype float32) unless the 16-bit numerics are "
        "the point.",
        what,
        str(dtype).removeprefix("torch."),
        torch.backends.cpu.get_cpu_capability(),
    )
