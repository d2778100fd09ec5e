"""Whether the built-in server's kernel warm-up already ran on this machine (`mtptune serve --kernel-warmup`).

The warm-up (`VerifierRuntime.warm_up_batch_sizes`) exists to fill two caches before live requests arrive: Triton's
compiled kernels and, with TRITON_CACHE_AUTOTUNING=1 (which mtptune's entry point sets), Triton's autotuning results,
both kept under TRITON_CACHE_DIR. Once they hold this exact configuration, running it again at every start only
repeats ~25 s of forwards (a 9B verifier, 64 row counts) whose kernels then come from the cache. So a finished warm-up
leaves a record in TRITON_CACHE_DIR itself (removing the cache removes the record), keyed by everything that decides
which kernels and tunings it produced; `auto` skips the warm-up when that record exists and tuning results persist.
Skipping is never a correctness risk: a kernel missing from the cache is compiled or tuned inside a live forward.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

WARMUP_MODES = ("auto", "always", "never")


def _version(package: str) -> str | None:
    from importlib import metadata  # here: the CLI imports this module for WARMUP_MODES on every start

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _without_paths(value):
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k != "_name_or_path"}
    return value


def warmup_fingerprint(model_config: dict, dtype: str, device_name: str, **plan) -> dict:
    """What decides the kernels a warm-up compiles and tunes: the verifier's architecture (its config, not its weights
    nor where it lives), dtype, the GPU, the kernel libraries' versions and the warm-up plan (row counts, widths,
    token blocks)."""
    config_json = json.dumps(_without_paths(model_config), sort_keys=True, default=str)
    return {
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "dtype": dtype,
        "device": device_name,
        "versions": {p: _version(p) for p in ("torch", "triton", "flash-linear-attention", "transformers")},
        "plan": plan,
    }


def record_path(fingerprint: dict) -> Path | None:
    """Where the record of a finished warm-up with this fingerprint lives; None when Triton's tuning does not persist
    (without TRITON_CACHE_AUTOTUNING=1 every start tunes again, so the warm-up is always worth running)."""
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    if os.environ.get("TRITON_CACHE_AUTOTUNING") != "1" or not cache_dir:
        return None
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / "mtptune-server-warmup" / f"{key}.json"


def should_warm_up(mode: str, record: Path | None) -> bool:
    if mode not in WARMUP_MODES:
        raise ValueError(f"kernel warm-up mode {mode!r}: expected one of {', '.join(WARMUP_MODES)}")
    if mode == "never":
        return False
    return mode == "always" or record is None or not record.is_file()


def write_record(record: Path | None, fingerprint: dict, seconds: float) -> None:
    """Written after the warm-up finished (a start killed half-way leaves no record), atomically."""
    if record is None:
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**fingerprint, "seconds": round(seconds, 1), "time": time.time()}, indent=1))
    os.replace(tmp, record)
