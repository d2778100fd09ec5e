"""The pure-Python parts of the device benchmarks, checked here because the device call that uses them is one-shot:
the wheel resolver (benchmarks/wheels.py), the row-length mixes (length_models.py), the three throughput measures of
both trainers (train_step.py, peer/summarize_run.py) and a CPU smoke run of the loss-kernel A/B."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "peer"))

import length_models  # noqa: E402
import summarize_run  # noqa: E402
import wheels  # noqa: E402
from packaging.version import Version  # noqa: E402


def make_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", meta)


def test_wheel_resolver_takes_the_image_then_the_newest_fitting_wheel_and_names_what_is_missing(tmp_path):
    make_wheel(tmp_path, "peer", "1.0", ["data>=4", "pydantic>=2", "colorama; sys_platform == 'win32'"])
    make_wheel(tmp_path, "data", "5.1.0", ["arrow>=24", "fsspec[http]<=2026.7.0"])
    make_wheel(tmp_path, "data", "4.8.5", ["arrow>=21", "fsspec[http]<=2026.2.0"])
    make_wheel(tmp_path, "fsspec", "2026.2.0", ["aiohttp; extra == 'http'"])
    make_wheel(tmp_path, "pydantic", "2.14.4", ["typing-extensions>=4.16"])
    make_wheel(tmp_path, "typing-extensions", "4.16.0", [])
    found = wheels.read_wheels([tmp_path])
    env = wheels.device_env("3.12")
    new_image = {"arrow": Version("26.0"), "fsspec": wheels.UNKNOWN, "typing-extensions": wheels.UNKNOWN}
    result = wheels.resolve(["peer"], found, new_image, env)
    assert result.ok and {n: str(w.version) for n, w in result.chosen.items()} == {
        "peer": "1.0",
        "data": "5.1.0",
        "pydantic": "2.14.4",
    }
    assert any(a.startswith("fsspec: image version unknown") for a in result.assumed)
    old_image = {"arrow": Version("23.0"), "fsspec": Version("2026.9.0"), "typing-extensions": Version("4.12.2")}
    result = wheels.resolve(["peer"], found, old_image, env)
    chosen = {n: str(w.version) for n, w in result.chosen.items()}
    assert chosen["data"] == "4.8.5" and chosen["fsspec"] == "2026.2.0" and chosen["typing-extensions"] == "4.16.0"
    assert result.missing == ["aiohttp: needs any (fsspec 2026.2.0); installed no; carried none"]
    assert "colorama" not in chosen


def test_row_mixes_match_the_peer_data_and_the_gsm8k_tables():
    long = length_models.row_layout("long", 400)
    assert all(300 <= p + a <= 1500 and 60 <= p <= 200 and t == 0 for p, a, t in long)
    gsm = length_models.row_layout("gsm8k", 5000)
    mean = sum(map(sum, gsm)) / len(gsm)
    assert 195 < mean < 210 and all(t == 1 for _, _, t in gsm)
    counts = length_models.supervised_rows_per_step("gsm8k", 1400, batches=2)
    assert len(counts) == 2 and all(len(c) == 3 and 4000 < c[0] <= 8192 for c in counts)


def steps(log_freq: int, n: int, ms: float = 300.0, real: float = 7000.0) -> list[dict]:
    out, wall = [], 100.0
    for g in range(n):
        wall += ms / 1000
        if g % log_freq == 0:
            prof = {"step_ms": ms, "tokens_per_s": real / (ms / 1000)}
            out.append({"global_step": g, "wall_s": wall + 0.001 * g, "profile": prof})
    return out


def test_peer_throughput_the_three_ways_at_log_freq_1_and_10():
    one = summarize_run.throughput(steps(1, 44), 5, set(), 8192)
    assert one["log_freq"] == 1 and one["timed_steps"] == 38
    assert one["median_interval_tokens_per_s"] == pytest.approx(7000 / 0.3)
    assert one["mean_tokens_per_s"] == pytest.approx(7000 / 0.3)
    assert one["wall_tokens_per_s"] < one["mean_tokens_per_s"]  # the 1 ms of logging per step counts in the wall
    ten = steps(10, 44)
    other = {g: 7000.0 for g in range(44)}
    with_other = summarize_run.throughput(ten, 5, set(), 8192, other)
    assert with_other["log_freq"] == 10 and with_other["real_tokens_source"] == "other_run"
    assert with_other["timed_steps"] == 30 and with_other["median_interval_tokens_per_s"] == pytest.approx(
        70000 / 3.01, rel=1e-6
    )
    # The log-freq-1 run stopped logging at step 36: the steps it lacks count its mean, not 0.
    shorter = summarize_run.throughput(ten, 5, set(), 8192, {g: v for g, v in other.items() if g <= 36})
    assert shorter["steps_at_other_runs_mean"] == 4
    assert shorter["wall_tokens_per_s"] == pytest.approx(with_other["wall_tokens_per_s"])
    alone = summarize_run.throughput(ten, 5, set(), 8192)
    assert alone["real_tokens_source"] == "estimated" and alone["wall_tokens_per_s"] == pytest.approx(
        with_other["wall_tokens_per_s"]
    )


def test_train_step_three_ways_and_the_ratio_to_the_peer():
    train_step = pytest.importorskip("train_step")
    records = [{"tokens_per_s": 30000.0, "step_seconds": 0.25}, {"tokens_per_s": 34000.0, "step_seconds": 0.24}]
    ways = train_step.three_ways(records, 5, window_s=2.5)
    tokens = 30000 * 1.25 + 34000 * 1.2
    assert ways["mean_tokens_per_s"] == pytest.approx(tokens / 2.45, rel=1e-4)
    assert ways["wall_tokens_per_s"] == pytest.approx(tokens / 2.5, rel=1e-4) and ways["timed_steps"] == 10
    peer = {"median_interval_tokens_per_s": 23000.0, "mean_tokens_per_s": 22000.0, "wall_tokens_per_s": None}
    assert train_step.versus(ways, peer) == {
        "median_interval_tokens_per_s": round(32000 / 23000, 3),
        "mean_tokens_per_s": round(ways["mean_tokens_per_s"] / 22000, 3),
    }


def test_loss_kernel_ab_runs_on_the_cpu_and_reports_missing_libraries(tmp_path):
    out = tmp_path / "lk.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "loss_kernels.py"), "--rows", "40,30,20", "--hidden", "32",
           "--vocab", "500", "--reps", "1", "--warmup", "0", "--check-rows", "16", "--variants", "ours,ours-c4096,cce",
           "--out", str(out)]  # fmt: skip
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["variant"] for x in lines] == ["ours", "ours-c4096", "cce"]
    assert lines[0]["grad_rel_err"] < 2e-2 and lines[0]["loss_rel_err"] < 2e-3 and "vs_ours" in lines[1]
    assert "error" in lines[2]
