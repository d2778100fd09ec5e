"""`mtptune demo --quick` end to end (a real subprocess, as `make demo` runs it), then --keep and Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtptune.demo import SUMMARY_FILE, mtp_only_difference

pytestmark = pytest.mark.slow  # ~70 s for the module on the 2-core CI box


def demo(output: Path, *flags: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mtptune.cli.main", "demo", "--output", str(output), *flags]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1")
    )


def server_pids(stdout: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"server pid (\d+) stopped", stdout)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (reaped by nobody only if its parent is gone, which is what we test)
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, demo(out, "--quick")


def test_quick_demo_runs_the_whole_tutorial_and_learns(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = proc.stdout
    for sub in ("convert", "serve", "prepare", "train", "stitch", "evaluate offline", "evaluate generate"):
        assert f"$ mtptune {sub} " in text, sub
    assert "--on-missing generate --on-generate delete" in text
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert all(summary["checks"].values()) and len(summary["checks"]) == 5
    assert summary["offline_after"] > summary["offline_before"] + 0.5
    assert summary["generate_after"] > summary["generate_before"] + 0.3
    # online training left no hidden-state file behind, neither in the server's storage nor in the trainer's cache
    for storage in (out / "server_hidden_states", out / "prepared" / "hidden_states"):
        assert not storage.exists() or list(storage.iterdir()) == []
    assert (out / "checkpoints" / "checkpoint_best" / "model.safetensors").is_file()
    changed = mtp_only_difference(out / "verifier", out / "stitched")
    assert changed is not None and len(changed) == 15 and all(k.startswith("mtp.") for k in changed)
    for report in ("offline", "generate"):
        for name in ("result.json", "baseline.json", "acceptance.csv", "acceptance.png"):
            assert (out / "report" / report / name).is_file(), (report, name)
    # the held-out rows were never trained on
    train = {json.dumps(json.loads(line)["input_ids"][:3]) for line in (out / "data" / "train.jsonl").open()}
    test = {json.dumps(json.loads(line)["input_ids"][:3]) for line in (out / "data" / "test.jsonl").open()}
    assert train and test and not train & test
    pids = server_pids(text)
    assert len(pids) == 1 and not alive(pids[0])


def test_keep_reuses_finished_steps(quick_run):
    out, first = quick_run
    assert first.returncode == 0
    proc = demo(out, "--quick", "--keep")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "reusing the cached verifier" in proc.stdout
    for kept in ("converted", "data", "checkpoints", "stitched"):
        assert f"kept {out / kept}" in proc.stdout, kept
    assert server_pids(proc.stdout) == []  # nothing needed the server
    assert "$ mtptune evaluate offline" in proc.stdout


def test_interrupt_stops_the_server(quick_run):
    out, _ = quick_run
    cmd = [sys.executable, "-m", "mtptune.cli.main", "demo", "--quick", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, pid = [], None
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if match := re.search(r"/health -> 200 after .* \(pid (\d+)\)", line):
            pid = int(match.group(1))
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=60)
    assert pid is not None, "".join(lines)
    assert proc.returncode == 130, "".join(lines) + rest
    assert f"server pid {pid} stopped" in rest
    assert "--keep` resumes" in rest
    assert not alive(pid)
