"""Where does a capture forward's time go? Prints ONE JSON line.

The server's capture forwards of the Qwen3.5-9B-shaped verifier ran at ~0.27-0.31 s whether they held 1.8k or 4.2k
tokens (docs/benchmarks.md, 8.2). This probe separates the candidate causes in one process, without HTTP:

- `repeat`: the same (rows, width) shape several times: the steady cost of a forward of that size;
- `new_widths`: same rows, widths never seen before: a per-shape cost (Triton recompiles or autotunes keyed on the
  sequence length) shows up as the first call of each width being slower than `repeat`;
- `new_rows`: same width, row counts never seen before (flash-linear-attention autotunes some kernels per batch size);
- `sizes`: warm forwards from 1k to 32k tokens: tokens/s against the FLOP floor (is the forward launch-bound?);
- `first_sight_by_backend`: first-sight widths with cuDNN on/off for the depthwise causal conv and for SDPA (cuDNN
  builds an execution plan for every new input shape; a server sees a new prompt width in nearly every forward);
- `profile`: torch.profiler (CPU + CUDA) over warm forwards: host time of the launching thread vs GPU kernel time,
  and the top ops by host time and by GPU time, written to --profile.

    source benchmarks/device_setup.sh; PYTHONPATH=/tmp/fla:$PYTHONPATH python3 benchmarks/capture_probe.py
    OMP_NUM_THREADS=1 python benchmarks/capture_probe.py --tiny      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from matmul_peak import matmul_rate  # this folder (the script's own) is on sys.path
from serve_gpu import QWEN35_9B, TINY, capture_flops, write_config_only_verifier

from mtptune.serving.hidden_state_files import write_hidden_states_file
from mtptune.serving.verifier_runtime import VerifierRuntime


def timed_capture(runtime: VerifierRuntime, rows: int, width: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, min(5000, runtime.vocab_size), (rows, width), generator=generator).tolist()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    start = time.perf_counter()
    runtime.capture(prompts)  # ends with a device sync (the copy back)
    return time.perf_counter() - start


def write_files_until(stop: threading.Event, hidden: int) -> None:
    """What the server's writer threads do meanwhile: hidden-state files of ~400-token requests, back to back."""
    states = torch.randn(400, 1, hidden).to(torch.bfloat16)
    ids = torch.arange(400)
    with tempfile.TemporaryDirectory() as tmp:
        while not stop.is_set():
            path = Path(tmp) / "hs.safetensors"
            write_hidden_states_file(path, states, ids)
            path.unlink()


def profile_forwards(runtime: VerifierRuntime, rows: int, width: int, repeats: int, table_path: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    timed_capture(runtime, rows, width, 0)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for i in range(repeats):
            timed_capture(runtime, rows, width, i)
        wall = (time.perf_counter() - start) / repeats
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_busy = sum(e.device_time for e in kernels) / 1e6 / repeats if kernels else 0.0
    launches = sum(1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    sort_gpu = "self_device_time_total" if runtime.device.type == "cuda" else "self_cpu_time_total"
    table_path.write_text(
        f"# {repeats} capture forwards of {rows} x {width} tokens, {wall * 1e3:.1f} ms wall each\n\n"
        "## by self host time\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=40)
        + "\n\n## by self GPU time\n"
        + events.table(sort_by=sort_gpu, row_limit=40)
    )
    return {
        "rows": rows,
        "width": width,
        "wall_ms": round(wall * 1e3, 1),
        "gpu_kernel_ms": round(gpu_busy * 1e3, 1),
        "gpu_busy_fraction": round(gpu_busy / wall, 3) if wall else None,
        "kernel_launches_per_forward": launches // repeats,
    }


CUDNN_SETTINGS = {  # name: (cuDNN for convolutions, cuDNN backend of scaled_dot_product_attention)
    "default": (True, True),
    "no_cudnn_conv": (False, True),
    "no_cudnn_sdpa": (True, False),
    "no_cudnn": (False, False),
}


def set_cudnn(conv: bool, sdpa: bool) -> None:
    torch.backends.cudnn.enabled = conv
    torch.backends.cuda.enable_cudnn_sdp(sdpa)


def first_sight_by_backend(runtime: VerifierRuntime, rows: int, width: int) -> dict:
    """Median seconds of forwards at odd widths never seen before (the kind of width was compiled already) and of
    the same widths again, for each cuDNN setting (distinct widths per setting)."""
    import statistics

    out = {}
    for i, (name, flags) in enumerate(CUDNN_SETTINGS.items()):
        set_cudnn(*flags)
        widths = [width + 201 + 40 * i + 2 * k for k in range(3)]
        first = [timed_capture(runtime, rows, w, k) for k, w in enumerate(widths)]
        again = [timed_capture(runtime, rows, w, k) for k, w in enumerate(widths)]
        out[name] = {"first_s": round(statistics.median(first), 3), "again_s": round(statistics.median(again), 3)}
    set_cudnn(True, True)
    return out


def profile_first_sight(runtime: VerifierRuntime, rows: int, width: int, table_path: Path) -> float:
    """Host-side op table of one forward at a width never seen before (what the extra time is spent in)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = timed_capture(runtime, rows, width, 0)
    table_path.write_text(
        f"# one capture forward of {rows} x {width} tokens at a width never seen before, {seconds * 1e3:.1f} ms\n\n"
        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    )
    return round(seconds, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen3.5 on the CPU (development)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--profile", type=Path, default=None, help="write the profiler tables here")
    args = parser.parse_args()
    dims, device = (TINY, args.device or "cpu") if args.tiny else (QWEN35_9B, args.device or "cuda")
    rows, width = (2, 64) if args.tiny else (args.rows, args.width)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "verifier"
        text = write_config_only_verifier(model_dir, dims)
        start = time.perf_counter()
        runtime = VerifierRuntime.load(
            str(model_dir), [text["num_hidden_layers"]], device=device, dtype="bfloat16", load_format="dummy"
        )
        result: dict = {"load_s": round(time.perf_counter() - start, 1), "device": device}
        if device.startswith("cuda"):
            result["card"] = torch.cuda.get_device_name(runtime.device)
            result["matmul_tflops"] = round(matmul_rate(device, 8192, torch.bfloat16) / 1e12, 1)
        result["first_call_s"] = round(timed_capture(runtime, rows, width, 0), 3)
        result["repeat_s"] = [round(timed_capture(runtime, rows, width, i), 3) for i in range(4)]
        step = 1 if args.tiny else 7
        result["new_widths_s"] = {
            width + step * k: round(timed_capture(runtime, rows, width + step * k, k), 3) for k in range(1, 5)
        }
        result["new_widths_again_s"] = {
            width + step * k: round(timed_capture(runtime, rows, width + step * k, k), 3) for k in range(1, 5)
        }
        result["new_rows_s"] = {r: round(timed_capture(runtime, r, width, r), 3) for r in (rows + 1, rows + 3)}
        result["new_rows_again_s"] = {r: round(timed_capture(runtime, r, width, r), 3) for r in (rows + 1, rows + 3)}
        # The server runs forwards on a worker thread while writer threads save files: same shape, same costs?
        with ThreadPoolExecutor(1) as worker:
            result["thread_repeat_s"] = [
                round(worker.submit(timed_capture, runtime, rows, width, i).result(), 3) for i in range(3)
            ]
            stop = threading.Event()
            writer = threading.Thread(target=write_files_until, args=(stop, runtime.hidden_size), daemon=True)
            writer.start()
            result["thread_with_writer_s"] = [
                round(worker.submit(timed_capture, runtime, rows, width, i).result(), 3) for i in range(3)
            ]
            stop.set()
            writer.join()
        sizes = [(2, 32), (4, 64)] if args.tiny else [(2, 512), (8, 512), (16, 512), (32, 512), (32, 1024)]
        per_size = []
        for r, w in sizes:
            timed_capture(runtime, r, w, 1)  # first sight of the shape
            seconds = min(timed_capture(runtime, r, w, s) for s in range(2))
            entry = {"rows": r, "width": w, "tokens": r * w, "s": round(seconds, 3)}
            entry["tokens_per_s"] = round(r * w / seconds)
            if "matmul_tflops" in result:
                parts = capture_flops([w] * r, text)
                flops = sum(v for k, v in parts.items() if k != "decoder_params")
                entry["fraction_of_floor"] = round(flops / (result["matmul_tflops"] * 1e12) / seconds, 3)
            per_size.append(entry)
        result["sizes"] = per_size
        if runtime.device.type == "cuda":
            result["first_sight_by_backend"] = first_sight_by_backend(runtime, rows, width)
        if args.profile is not None:
            result["profile"] = profile_forwards(runtime, rows, width, 3, args.profile)
            first_sight_table = args.profile.with_name(args.profile.stem + "_first_sight.txt")
            result["profile_first_sight_s"] = profile_first_sight(runtime, rows, width + 401, first_sight_table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
