"""The one place a device name from a flag (`--device`, `--validate-device`) becomes a torch device: `auto` picks the
GPU when there is one, and a device this machine lacks is a ConfigError naming the flag, not a traceback from
deep inside torch."""

from __future__ import annotations

import torch

from mtptune.errors import ConfigError


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
