"""The colocated verifier forward alone (issue 18 item 4): prompt tokens/s on GSM8K-length rows against the FLOP
floor, with `mtptune train --colocated`'s fixed forward shapes and, for comparison, with the server's planner.

A Qwen3.5-9B-shaped verifier with random weights (`--load-format dummy`, config as make_fake_verifier.py writes it)
runs `ColocatedSource.stream` over rows whose lengths follow GSM8K (benchmarks/online_pipeline.py's sampler):

- `fixed_cold`: the first pass, first-sight costs included (flash-linear-attention's autotuning per batch size and
  token-block count, Triton compiles): what a training run pays in its first epoch;
- `fixed_warm`: a second pass over other rows of the same mix: the steady rate;
- `planner_warm`: the same rows grouped as the built-in server groups a queue (`plan_forwards`: any row count and
  width within the token budget), after one pass to see its shapes.

Each: seconds, real tokens/s, padding fill, forwards, and the fraction of the FLOP floor (the real tokens' FLOPs
at the measured bf16 matmul rate). Prints ONE JSON line.

    source benchmarks/device_setup.sh; PYTHONPATH=/tmp/fla:$PYTHONPATH python3 benchmarks/colocated_forward.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/colocated_forward.py --tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from matmul_peak import matmul_rate  # this folder (the script's own) is on sys.path
from online_pipeline import TRAILING_TOKENS, sample_gsm8k_lengths
from serve_gpu import QWEN35_9B, TINY, capture_flops, write_config_only_verifier

from mtptune.data.rows import Row
from mtptune.serving.colocated import CPU_SHAPES, GPU_SHAPES, ColocatedSource, ForwardShapes
from mtptune.serving.request_batching import plan_forwards
from mtptune.serving.verifier_runtime import VerifierRuntime


def make_rows(n: int, seed: int, vocab: int) -> list[Row]:
    rng = random.Random(seed)
    lengths = [p + a + TRAILING_TOKENS for p, a in sample_gsm8k_lengths(n, seed)]
    return [Row(i, [rng.randrange(10, vocab) for _ in range(n_tok)], [1] * n_tok) for i, n_tok in enumerate(lengths)]


def sync(runtime: VerifierRuntime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def run_fixed(runtime: VerifierRuntime, rows: list[Row], shapes: ForwardShapes) -> dict:
    source = ColocatedSource(runtime, shapes)
    sync(runtime)
    start = time.perf_counter()
    count = sum(1 for _ in source.stream(rows))
    sync(runtime)
    seconds = time.perf_counter() - start
    c = source.counters
    assert count == len(rows)
    return {"s": seconds, "tokens": c.tokens, "padded_tokens": c.padded_tokens, "forwards": c.forwards}


def run_planner(runtime: VerifierRuntime, rows: list[Row], budget: int, max_rows: int | None) -> dict:
    lengths = [len(r) for r in rows]
    runs = plan_forwards(lengths, budget, max_rows=max_rows)
    sync(runtime)
    start = time.perf_counter()
    padded = 0
    for members in runs:
        runtime.residuals([rows[i].input_ids.tolist() for i in members])
        padded += len(members) * max(lengths[i] for i in members)
    sync(runtime)
    return {"s": time.perf_counter() - start, "tokens": sum(lengths), "padded_tokens": padded, "forwards": len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen3.5 on the CPU (development)")
    parser.add_argument("--rows", type=int, default=None, help="rows per pass (default 1500; tiny 48)")
    parser.add_argument("--forward-tokens", type=int, default=None, help="fixed shapes' tokens per forward")
    args = parser.parse_args()
    dims, device = (TINY, "cpu") if args.tiny else (QWEN35_9B, "cuda")
    n = args.rows or (48 if args.tiny else 1500)
    shapes = CPU_SHAPES if args.tiny else GPU_SHAPES
    if args.forward_tokens:
        shapes = ForwardShapes(args.forward_tokens, shapes.width_step)
    with tempfile.TemporaryDirectory() as tmp:
        text = write_config_only_verifier(Path(tmp) / "verifier", dims)
        start = time.perf_counter()
        runtime = VerifierRuntime.load(
            str(Path(tmp) / "verifier"), [text["num_hidden_layers"]], device=device, dtype="bfloat16",
            load_format="dummy", with_tokenizer=False,
        )  # fmt: skip
        result: dict = {"benchmark": "colocated_forward", "date": time.strftime("%Y-%m-%d"), "device": device,
                        "load_s": round(time.perf_counter() - start, 1), "rows_per_pass": n,
                        "forward_tokens": shapes.tokens, "width_step": shapes.width_step}  # fmt: skip
        rate = None
        if device == "cuda":
            result["card"] = torch.cuda.get_device_name(runtime.device)
            rate = matmul_rate(device, 8192, torch.bfloat16)
            result["matmul_tflops"] = round(rate / 1e12, 1)
        vocab = min(text["vocab_size"], 5000)
        passes = {
            "fixed_cold": lambda rows: run_fixed(runtime, rows, shapes),
            "fixed_warm": lambda rows: run_fixed(runtime, rows, shapes),
        }
        for seed, (name, fn) in enumerate(passes.items()):
            result[name] = fn(make_rows(n, seed, vocab))
            print(json.dumps({"pass": name, **result[name]}), file=sys.stderr, flush=True)
        planner_rows = make_rows(n, 7, vocab)
        run_planner(runtime, planner_rows, shapes.tokens, 64)  # first sight of the planner's shapes
        result["planner_warm"] = run_planner(runtime, make_rows(n, 8, vocab), shapes.tokens, 64)
        for name in ("fixed_cold", "fixed_warm", "planner_warm"):
            _finish(result[name], rate, text, make_rows(n, 0, vocab))
    print(json.dumps(result), flush=True)


def _finish(entry: dict, rate: float | None, text: dict, rows: list[Row]) -> None:
    entry["tokens_per_s"] = round(entry["tokens"] / entry["s"])
    entry["fill"] = round(entry["tokens"] / entry["padded_tokens"], 3)
    if rate is not None:
        flops = capture_flops([len(r) for r in rows], text)
        per_token = sum(v for k, v in flops.items() if k != "decoder_params") / sum(len(r) for r in rows)
        entry["fraction_of_floor"] = round(per_token * entry["tokens"] / rate / entry["s"], 3)
    entry["s"] = round(entry["s"], 2)


if __name__ == "__main__":
    main()
