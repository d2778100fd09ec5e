"""Trainer-step benchmark on the peer's workload: prints ONE JSON line.

Workload (benchmarks/peer/README-equivalent, shared with speculators' run in the same device call):
a Qwen3.5-9B-shaped head (hidden 4096, vocab 248,320, one MTP layer), K=3, beta 0.6, --total-seq-len 8192,
offline hidden-state files (`make_offline_data.py`, fixed seed) packed into 8192-token steps.

It runs mtptune's real trainer (`run_training`, offline mode) for --steps optimizer steps, reads its per-step
metrics.jsonl, and reports real tokens/s over the timed window [--warmup intervals, --steps) the three ways the peer's
summary does too (`benchmarks/peer/summarize_run.py`): the median over logged intervals (`real_tokens_per_s`, one
device sync per interval of --log-every steps), the mean over all timed steps (their tokens over their summed
interval times) and the wall clock over the window (synced at both ends, the logging between intervals included);
peak CUDA memory; and the compute floor of the measured batches: the FLOPs that must be done over the measured bf16
matmul rate. With --profile the kernel table covers 5 steps after the timed window.

    python benchmarks/train_step.py --verifier W/verifier --data W/data --hidden-states W/hs [--peer W/runA/summary.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from matmul_peak import matmul_rate  # this folder (the script's own) is on sys.path

from mtptune.training.config import (
    COMPILE_SCOPES,
    CheckpointConfig,
    DataConfig,
    HiddenStatesConfig,
    LoggingConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
)
from mtptune.training.loss_kernels import DEFAULT_LOSS_KERNEL, LOSS_KERNELS, resolve_loss_kernel
from mtptune.training.train import run_training


def step_flops(tokens: float, supervised_rows: float, hidden: int, inter: int, vocab: int, heads: int, kv: int,
               head_dim: int, steps: int, mean_doc: float, reference_fraction: float) -> float:  # fmt: skip
    """FLOPs one optimizer step must do: forward + backward of the head (3x forward for trained weights),
    forward + input-gradient of the frozen LM head (2x forward) on supervised rows only, attention of each
    document (causal half) and, on the `reference_fraction` of steps that log tau_sim, the verifier's greedy
    reference over all rows once."""
    per_token_macs = 2 * hidden * hidden + hidden * heads * head_dim * 2 + 2 * hidden * kv * head_dim
    per_token_macs += heads * head_dim * hidden + 3 * hidden * inter
    trunk = 3 * 2 * per_token_macs * tokens * steps
    attention = 3 * 2 * 2 * heads * head_dim * (mean_doc / 2) * tokens * steps
    lm_head = 2 * 2 * vocab * hidden * supervised_rows + reference_fraction * 2 * vocab * hidden * tokens
    return trunk + attention + lm_head


class WindowClock:
    """`should_stop` hook of run_training (called at the start of every step): the wall time at which steps `first`
    and `last` start (multiples of --log-every: the step before each ended with a flush, i.e. a device sync), and
    the profiler's hook after it."""

    def __init__(self, first: int, last: int, then=None) -> None:
        self.first, self.last, self.then = first, last, then
        self.times: dict[int, float] = {}

    def __call__(self, step: int) -> bool:
        if step in (self.first, self.last):
            self.times[step] = time.perf_counter()
        return bool(self.then(step)) if self.then is not None else False

    @property
    def seconds(self) -> float | None:
        return self.times[self.last] - self.times[self.first] if len(self.times) == 2 else None


def three_ways(records: list[dict], log_every: int, window_s: float | None) -> dict:
    """Real tokens/s of the logged intervals `records` (one per --log-every steps): median per interval, mean over
    the timed steps, wall clock over the window."""
    elapsed = [r["step_seconds"] * log_every for r in records]
    tokens = [r["tokens_per_s"] * e for r, e in zip(records, elapsed)]
    out = {
        "median_interval_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in records), 1),
        "median_interval_step_ms": round(statistics.median(r["step_seconds"] for r in records) * 1e3, 1),
        "mean_tokens_per_s": round(sum(tokens) / sum(elapsed), 1),
        "mean_step_ms": round(sum(elapsed) / (len(records) * log_every) * 1e3, 1),
        "timed_steps": len(records) * log_every,
    }
    if window_s:
        out.update(
            wall_tokens_per_s=round(sum(tokens) / window_s, 1),
            wall_step_ms=round(window_s / (len(records) * log_every) * 1e3, 1),
            window_s=round(window_s, 2),
        )
    return out


def versus(mine: dict, peer: dict | None) -> dict:
    """mtptune's tokens/s over the peer's, each of the three ways."""
    if not peer:
        return {}
    return {
        key: round(mine[key] / peer[key], 3)
        for key in ("median_interval_tokens_per_s", "mean_tokens_per_s", "wall_tokens_per_s")
        if mine.get(key) and peer.get(key)
    }


class StepProfiler:
    """`should_stop` hook of run_training (called at the start of every step): profiles steps [first, last)."""

    def __init__(self, first: int, last: int, trace_dir: Path | None = None) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.first, self.last, self.trace_dir = first, last, trace_dir
        if trace_dir is None:  # kernel table only: CPU tracing would slow the host
            self.prof = profile(activities=[ProfilerActivity.CUDA])
        else:  # host + device timeline with Python stacks, to attribute the GPU's idle gaps (trace_gaps.py)
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True)
        self.t0 = None
        self.wall = None

    def __call__(self, step: int) -> bool:
        if step == self.first:
            torch.cuda.synchronize()
            self.prof.start()
            self.t0 = time.perf_counter()
        elif step == self.last and self.t0 is not None:
            torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.t0
            self.prof.stop()
        return False

    def finish(self, table_path: Path) -> dict:
        if self.wall is None:
            return {"error": "the profiled steps were not reached"}
        averages = self.prof.key_averages()
        table_path.write_text(averages.table(sort_by="self_cuda_time_total", row_limit=50))
        kernel_s = sum(getattr(e, "self_device_time_total", 0.0) for e in averages) / 1e6
        steps = self.last - self.first
        result = {
            "steps": steps,
            "wall_ms_per_step": round(self.wall / steps * 1e3, 1),
            "kernel_ms_per_step": round(kernel_s / steps * 1e3, 1),
            "gpu_busy_fraction": round(kernel_s / self.wall, 3),
        }
        if self.trace_dir is not None:
            from trace_gaps import summarize

            self.trace_dir.mkdir(parents=True, exist_ok=True)
            trace = self.trace_dir / "trace.json"
            self.prof.export_chrome_trace(str(trace))
            result["gaps"], text = summarize(trace)
            (self.trace_dir / "gaps.txt").write_text(text)
            (self.trace_dir / "host_ops.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=60))
            # With CPU activity recorded, key_averages also charges kernel time to the launching ops (counted
            # twice: a busy fraction of 1.46 was reported); the trace's own GPU timeline is the right count.
            gaps = result["gaps"]
            if "gpu_busy_ms" in gaps:
                result["kernel_ms_per_step"] = round(gaps["gpu_busy_ms"] / steps, 1)
                result["gpu_busy_fraction"] = round(gaps["gpu_busy_ms"] / gaps["span_ms"], 3)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verifier", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--hidden-states", required=True)
    parser.add_argument("--steps", type=int, default=30, help="timed steps end here (a multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per logged interval (one device sync each)")
    parser.add_argument("--warmup", type=int, default=2, help="logged intervals skipped (compilation, warm-up)")
    parser.add_argument("--total-seq-len", type=int, default=8192)
    parser.add_argument("--chunk-rows", type=int, default=2048)
    parser.add_argument("--peer", default=None, help="the peer's summary.json from the same device call")
    parser.add_argument("--label", default="mtptune")
    parser.add_argument("--compile", choices=COMPILE_SCOPES, default="step", help="the trainer's --compile")
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw", help="the trainer's --optimizer")
    parser.add_argument(
        "--loss-kernel", choices=LOSS_KERNELS, default=DEFAULT_LOSS_KERNEL, help="the trainer's --loss-kernel"
    )
    parser.add_argument("--mix", default="long", help="label: the row-length mix of --data (length_models.py)")
    parser.add_argument(
        "--profile",
        default=None,
        help="profile steps [--steps, --steps + 5) (after the timed window; the run goes on to --steps + 6) with "
        "torch.profiler: write the kernel table here and report the GPU busy fraction (kernel time / wall time of "
        "those steps; 1.0 = the host never starves the GPU)",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="with --profile: also record host + device activity with Python stacks and write trace.json, gaps.txt "
        "(the GPU's idle gaps charged to the host code that launched late, benchmarks/trace_gaps.py) and host_ops.txt "
        "into this folder (tracing slows the host: step times of a traced run are not comparable)",
    )
    args = parser.parse_args()
    if args.steps % args.log_every or args.steps <= args.warmup * args.log_every:
        parser.error("--steps must be a multiple of --log-every beyond the --warmup intervals")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    profiling = bool(args.profile) and device == "cuda"
    work = Path(tempfile.mkdtemp(prefix="mtptune-bench-"))
    config = TrainConfig(
        verifier=args.verifier,
        data=DataConfig(data_path=args.data, total_seq_len=args.total_seq_len, train_data_ratio=1.0),
        checkpoint=CheckpointConfig(save_path=str(work / "ckpt"), save_best=False, resume=False),
        hidden_states=HiddenStatesConfig(hidden_states_path=args.hidden_states, on_missing="raise", prefetch=64),
        optim=OptimConfig(name=args.optimizer),
        loss=LossConfig(chunk_rows=args.chunk_rows, kernel=args.loss_kernel),
        logging=LoggingConfig(log_dir=str(work / "logs"), log_every=args.log_every, progress_bar=False),
        num_speculative_steps=3,
        epochs=1,
        max_steps=args.steps + (6 if profiling else 1),  # step --steps starts after a flush: the window's end
        validate_at_start=False,
        device=device,
        compile=args.compile,
    )
    t0 = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    profiler = StepProfiler(args.steps, args.steps + 5, args.trace) if profiling else None
    clock = WindowClock(args.warmup * args.log_every, args.steps, profiler)
    run_training(config, should_stop=clock)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (work / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    steady = [r for r in train if args.warmup * args.log_every < r["step"] <= args.steps] or train
    ways = three_ways(steady, args.log_every, clock.seconds)
    tok_s = statistics.median(r["tokens_per_s"] for r in steady)
    tokens = statistics.mean(r["tokens"] for r in steady) if "tokens" in steady[0] else float("nan")
    step_s = statistics.median(r.get("step_seconds", float("nan")) for r in steady)
    result = {
        "benchmark": "train_step",
        "label": args.label,
        "mix": args.mix,
        "compile": args.compile,
        "optimizer": args.optimizer,
        "loss_kernel": resolve_loss_kernel(args.loss_kernel, "ce", device),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps_measured": len(steady) * args.log_every,
        "log_every": args.log_every,
        "real_tokens_per_s": round(tok_s, 1),
        "step_ms": round(step_s * 1e3, 1),
        "tokens_per_step": round(tokens, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "wait_fraction": round(statistics.median(r.get("wait_fraction", 0.0) for r in steady), 4),
        "wall_s": round(wall, 1),
        "throughput": ways,
    }
    if device == "cuda":
        rate = matmul_rate(device)
        sup = statistics.mean(sum(r[f"tokens_step_{k}"] for k in range(3)) for r in steady)
        doc = statistics.mean(r.get("mean_doc_len", 900.0) for r in steady)
        flops = step_flops(tokens, sup, 4096, 12288, 248320, 16, 4, 256, 3, doc, 1 / args.log_every)
        result.update(
            matmul_tflops=round(rate / 1e12, 1),
            floor_ms=round(flops / rate * 1e3, 1),
            floor_fraction=round(flops / rate / step_s, 3) if step_s == step_s else None,
        )
    if profiler is not None:
        result["profile"] = profiler.finish(Path(args.profile))
    if args.peer and Path(args.peer).is_file():
        peer = json.loads(Path(args.peer).read_text())
        peer_tok = (
            (peer.get("tokens_per_s") or {}).get("median") if isinstance(peer.get("tokens_per_s"), dict) else None
        )
        peer_tok = peer_tok or peer.get("real_tokens_per_s_aggregate")
        result["peer"] = {
            "real_tokens_per_s": peer_tok,
            "step_ms": (peer.get("step_ms") or {}).get("median"),
            "peak_memory_gib": peer.get("peak_mem_alloc_gib"),
            "optimizers": (peer.get("setup") or {}).get("optimizers"),
            "throughput": peer.get("throughput"),
        }
        if peer_tok:
            result["speedup_vs_peer"] = round(tok_s / peer_tok, 3)
        result["speedup_vs_peer_3ways"] = versus(ways, peer.get("throughput"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
