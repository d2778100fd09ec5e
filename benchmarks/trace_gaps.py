"""Why is the GPU idle? Attribute the gaps of a torch.profiler chrome trace to the host code that caused them.

For every gap between GPU activities (kernels, copies, memsets) longer than --min-gap-us, the GPU activity that ends
the gap was launched by some host call; when that launch happened *after* the GPU went idle, the host was late and
the gap is charged to the Python/aten stack around that launch (the innermost frames of our code and the op).
Host-side synchronizations (cudaStreamSynchronize, cudaDeviceSynchronize, blocking cudaMemcpy) are listed with
their stacks too. Needs a trace recorded with CPU + CUDA activities and `with_stack=True`.

    python benchmarks/trace_gaps.py trace.json [--min-gap-us 20] [--frames 3]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"python_function", "cpu_op", "cuda_runtime", "cuda_driver", "user_annotation"}
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
OWN_CODE = ("mtptune", "benchmarks/")


def _frame_label(name: str) -> str:
    # python_function names look like "src/mtptune/training/loss.py(123): mtp_loss"
    return name.split("/")[-1] if "(" in name else name


def _stacks_at(events: list[dict], queries: list[float]) -> list[list[dict]]:
    """The nested host events (outermost first) enclosing each query time, for one thread's events."""
    order = sorted(range(len(queries)), key=lambda i: queries[i])
    stacks: list[list[dict]] = [[] for _ in queries]
    stack: list[dict] = []
    position = 0
    for qi in order:
        t = queries[qi]
        while position < len(events) and events[position]["ts"] <= t:
            event = events[position]
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= event["ts"]:
                stack.pop()
            stack.append(event)
            position += 1
        stacks[qi] = [e for e in stack if e["ts"] + e.get("dur", 0) >= t]
    return stacks


def _describe(stack: list[dict], frames: int) -> str:
    own = [
        _frame_label(e["name"])
        for e in stack
        if e.get("cat") == "python_function" and any(o in e["name"] for o in OWN_CODE)
    ]
    ops = [e["name"] for e in stack if e.get("cat") == "cpu_op"]
    where = " > ".join(own[-frames:]) or "(no own frame)"
    return f"{where} | {ops[0] if ops else '-'}"


def summarize(trace_path: Path, min_gap_us: float = 20.0, frames: int = 3, top: int = 25) -> tuple[dict, str]:
    data = json.loads(Path(trace_path).read_text())
    events = [e for e in data.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        return {"error": "no GPU activity in the trace"}, "no GPU activity in the trace\n"
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    by_thread: dict = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATEGORIES:
            by_thread[e["tid"]].append(e)
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))

    span = gpu[-1]["ts"] + gpu[-1].get("dur", 0) - gpu[0]["ts"]
    busy_end = gpu[0]["ts"] + gpu[0].get("dur", 0)
    busy = float(gpu[0].get("dur", 0))
    gaps = []  # (gap_start, duration, next GPU event)
    for e in gpu[1:]:
        end = e["ts"] + e.get("dur", 0)
        if e["ts"] > busy_end:
            if e["ts"] - busy_end >= min_gap_us:
                gaps.append((busy_end, e["ts"] - busy_end, e))
            busy += e.get("dur", 0)
        else:
            busy += max(0.0, end - busy_end)
        busy_end = max(busy_end, end)

    # Charge each gap to the host stack at the launch of the activity that ended it (host late) or mark it as
    # "launched early" (the GPU waited on something else, e.g. a copy or an event).
    queries: dict = defaultdict(list)  # tid -> [(gap index, launch ts)]
    early = 0.0
    for index, (start, _, nxt) in enumerate(gaps):
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        if launch is None or launch["ts"] < start:
            early += gaps[index][1]
            continue
        queries[launch["tid"]].append((index, launch["ts"]))
    charged: dict = defaultdict(lambda: [0.0, 0])
    for tid, items in queries.items():
        stacks = _stacks_at(by_thread[tid], [t for _, t in items])
        for (index, _), stack in zip(items, stacks):
            key = _describe(stack, frames)
            charged[key][0] += gaps[index][1]
            charged[key][1] += 1
    syncs: dict = defaultdict(lambda: [0.0, 0])
    sync_events = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"] in SYNC_CALLS]
    sync_by_thread: dict = defaultdict(list)
    for e in sync_events:
        sync_by_thread[e["tid"]].append(e)
    for tid, items in sync_by_thread.items():
        stacks = _stacks_at(by_thread[tid], [e["ts"] + 1e-3 for e in items])
        for e, stack in zip(items, stacks):
            key = f"{e['name']} @ {_describe(stack, frames)}"
            syncs[key][0] += e.get("dur", 0)
            syncs[key][1] += 1

    idle = span - busy
    gap_total = sum(g[1] for g in gaps)
    summary = {
        "span_ms": round(span / 1e3, 2),
        "gpu_busy_ms": round(busy / 1e3, 2),
        "gpu_idle_ms": round(idle / 1e3, 2),
        "gaps": len(gaps),
        "gap_ms": round(gap_total / 1e3, 2),
        "gap_ms_launched_before_idle": round(early / 1e3, 2),
        "top_causes": [
            {"where": k, "ms": round(v[0] / 1e3, 2), "gaps": v[1]}
            for k, v in sorted(charged.items(), key=lambda kv: -kv[1][0])[:8]
        ],
    }
    lines = [
        f"# {trace_path}: GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms; "
        f"{len(gaps)} gaps >= {min_gap_us:.0f} us total {gap_total / 1e3:.1f} ms "
        f"({early / 1e3:.1f} ms of it with the next activity launched before the GPU went idle)",
        "",
        "## gap time by host stack at the late launch (ms, gaps, innermost own frames | outermost aten op)",
    ]
    for key, (total, count) in sorted(charged.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{total / 1e3:9.2f} {count:6d}  {key}")
    lines += ["", "## host synchronizations (ms, calls, where)"]
    for key, (total, count) in sorted(syncs.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{total / 1e3:9.2f} {count:6d}  {key}")
    return summary, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-gap-us", type=float, default=20.0)
    parser.add_argument("--frames", type=int, default=3)
    args = parser.parse_args()
    summary, text = summarize(args.trace, args.min_gap_us, args.frames)
    print(text)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
