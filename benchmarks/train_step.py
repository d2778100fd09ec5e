"""Trainer-step benchmark on the peer's workload: prints ONE JSON line.

Workload (benchmarks/peer/README-equivalent, shared with speculators' run in the same device call):
a Qwen3.5-9B-shaped head (hidden 4096, vocab 248,320, one MTP layer), K=3, beta 0.6, --total-seq-len 8192,
offline hidden-state files (`make_offline_data.py`, fixed seed) packed into 8192-token steps.

It runs mtptune's real trainer (`run_training`, offline mode) for --steps optimizer steps, reads its per-step
metrics.jsonl, and reports median real tokens/s and step time after --warmup steps, peak CUDA memory, and the
compute floor of the measured batches: the FLOPs that must be done over the measured bf16 matmul rate.

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
    TrainConfig,
)
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
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5, help="steps per logged interval (one device sync each)")
    parser.add_argument("--warmup", type=int, default=2, help="logged intervals skipped (compilation, warm-up)")
    parser.add_argument("--total-seq-len", type=int, default=8192)
    parser.add_argument("--chunk-rows", type=int, default=2048)
    parser.add_argument("--peer", default=None, help="the peer's summary.json from the same device call")
    parser.add_argument("--label", default="mtptune")
    parser.add_argument("--compile", choices=COMPILE_SCOPES, default="step", help="the trainer's --compile")
    parser.add_argument(
        "--profile",
        default=None,
        help="profile steps [--steps - 6, --steps - 1) with torch.profiler: write the kernel table here and report the "
        "GPU busy fraction (kernel time / wall time of those steps; 1.0 = the host never starves the GPU)",
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

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="mtptune-bench-"))
    config = TrainConfig(
        verifier=args.verifier,
        data=DataConfig(data_path=args.data, total_seq_len=args.total_seq_len, train_data_ratio=1.0),
        checkpoint=CheckpointConfig(save_path=str(work / "ckpt"), save_best=False, resume=False),
        hidden_states=HiddenStatesConfig(hidden_states_path=args.hidden_states, on_missing="raise", prefetch=64),
        loss=LossConfig(chunk_rows=args.chunk_rows),
        logging=LoggingConfig(log_dir=str(work / "logs"), log_every=args.log_every, progress_bar=False),
        num_speculative_steps=3,
        epochs=1,
        max_steps=args.steps,
        validate_at_start=False,
        device=device,
        compile=args.compile,
    )
    t0 = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    profiler = StepProfiler(args.steps - 6, args.steps - 1, args.trace) if args.profile and device == "cuda" else None
    run_training(config, should_stop=profiler)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (work / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    steady = train[args.warmup :] or train
    tok_s = statistics.median(r["tokens_per_s"] for r in steady)
    tokens = statistics.mean(r["tokens"] for r in steady) if "tokens" in steady[0] else float("nan")
    step_s = statistics.median(r.get("step_seconds", float("nan")) for r in steady)
    result = {
        "benchmark": "train_step",
        "label": args.label,
        "compile": args.compile,
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
        }
        if peer_tok:
            result["speedup_vs_peer"] = round(tok_s / peer_tok, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
