"""A real `mtptune serve --engine builtin` subprocess for tests and scripts: started on a free port, waited for
until `/health` answers, and always stopped again (terminated, killed if it lingers)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from mtptune.serving.server_config import free_port


@dataclass(frozen=True)
class ServerProcess:
    base: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path  # its stdout and stderr


@contextlib.contextmanager
def running_server(model: Path, storage: Path, *extra: str, startup_timeout: float = 90.0) -> Iterator[str]:
    """Start `python -m mtptune.cli.main serve MODEL --engine builtin ...`; yield its base URL once /health is 200."""
    with server_process(model, storage, *extra, startup_timeout=startup_timeout) as server:
        yield server.base


@contextlib.contextmanager
def server_process(
    model: Path,
    storage: Path,
    *extra: str,
    startup_timeout: float = 90.0,
    prefix: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[ServerProcess]:
    """As `running_server`, yielding the process and its log (`<storage>/../server-<port>.log`) too. `prefix` runs
    the server under another command (`unshare ... sh -c ... exec "$@"`, which must exec it so that the pid stays
    the server's); `preexec_fn` runs in the child before it starts (resource limits)."""
    port = free_port()
    log_path = storage.parent / f"server-{port}.log"
    cmd = [*prefix, sys.executable, "-m", "mtptune.cli.main", "serve", str(model), "--engine", "builtin"]
    cmd += ["--port", str(port), "--hidden-states-path", str(storage), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {startup_timeout} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield ServerProcess(base, proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
