"""Interop tests run speculators' own code in `.venv-interop` (see `make interop-env`); skipped without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Absolute: the speculators subprocess runs in a temp folder, where a relative venv path would not resolve.
INTEROP_PYTHON = Path(os.environ.get("MTPTUNE_INTEROP_VENV", REPO / ".venv-interop")).absolute() / "bin" / "python"
SIDE_SCRIPT = Path(__file__).with_name("speculators_side.py")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interop: runs the real speculators 0.9.0 package from .venv-interop")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if INTEROP_PYTHON.exists():
        return
    skip = pytest.mark.skip(reason=f"{INTEROP_PYTHON} not found: run `make interop-env` (or `make test-interop`)")
    for item in items:
        if "interop" in item.keywords:
            item.add_marker(skip)


def run_speculators(actions: list[dict], workdir: Path, timeout: int = 900) -> list[dict]:
    """Execute `actions` with speculators in one subprocess (its import costs ~10 s); one result per action."""
    job = workdir / "job.json"
    results = workdir / "results.json"
    job.write_text(json.dumps({"actions": actions, "results": str(results)}, indent=2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(INTEROP_PYTHON), str(SIDE_SCRIPT), str(job)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=workdir,
    )
    if proc.returncode != 0 or not results.exists():
        sys.stderr.write(proc.stderr[-5000:])
        raise AssertionError(f"speculators subprocess failed (exit {proc.returncode}); stderr tail above")
    return json.loads(results.read_text())
