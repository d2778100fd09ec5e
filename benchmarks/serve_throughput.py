"""Prompt tokens/s of the built-in hidden-state server vs a direct transformers forward of the same batches.

Starts `mtptune serve --engine builtin` on a small Qwen3.5 verifier, drives it with the trainer's HiddenStatesClient
(so the number includes HTTP, batching, file write, lock, read, validation and delete), then runs the same prompts
through the same decoder in batches of `--concurrency` in this process. Prints one JSON line.

`--concurrency` is the batch size (the server's token budget is concurrency × prompt-len, the direct forward uses
batches of that many rows); the client keeps `--in-flight` requests in flight (default 2 × concurrency, so that the
next batch is already queued while the model runs one; with exactly `concurrency` in flight the model idles during
every HTTP/file round trip and the batcher sees the next batch trickle in).

    .venv/bin/python benchmarks/serve_throughput.py --concurrency 8 --requests 32 --prompt-len 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from serve_gpu import start_server, stop_server  # this folder

from mtptune.serving.client import HiddenStatesClient
from mtptune.serving.server_config import free_port
from mtptune.serving.verifier_runtime import VerifierRuntime
from mtptune.testing.tiny import TinySpec, write_tiny_verifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--in-flight", type=int, default=None, help="client requests in flight (2 × concurrency)")
    args = parser.parse_args()
    in_flight = args.in_flight or 2 * args.concurrency

    work = Path(tempfile.mkdtemp(prefix="mtptune-bench-"))
    spec = TinySpec(
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        linear_head_dim=64,
        vocab_size=4096,
    )
    model_dir = write_tiny_verifier(work / "verifier", spec)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, spec.vocab_size - 1, (args.prompt_len,), generator=generator).tolist()
        for _ in range(args.requests)
    ]
    tokens = args.requests * args.prompt_len
    budget = args.concurrency * args.prompt_len

    port = free_port()
    cmd = [sys.executable, "-m", "mtptune.cli.main", "serve", str(model_dir), "--engine", "builtin", "--port",
           str(port), "--hidden-states-path", str(work / "hs"), "--max-batch-tokens", str(budget),
           "--batch-window-ms", str(args.batch_window_ms)]  # fmt: skip
    server, base, _ = start_server(cmd, work / "server.log", timeout=120)
    try:
        with HiddenStatesClient([base], concurrency=in_flight, hidden_size=spec.hidden_size) as client:
            list(client.iter_fetch([(i, prompts[i]) for i in range(args.concurrency)]))  # warm-up
            warm = httpx.get(base + "/metrics").text
            start = time.perf_counter()
            results = list(client.iter_fetch(enumerate(prompts), prefetch=2 * in_flight))
            server_s = time.perf_counter() - start
        failed = sum(isinstance(r, Exception) for _, r in results)
        metrics = httpx.get(base + "/metrics").text
    finally:
        stop_server(server, profiled=False)

    runtime = VerifierRuntime.load(str(model_dir), [spec.num_hidden_layers])
    batches = [prompts[i : i + args.concurrency] for i in range(0, len(prompts), args.concurrency)]
    runtime.capture(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        runtime.capture(batch)
    direct_s = time.perf_counter() - start

    def counter(name: str, text: str | None = None) -> float:
        lines = (text or metrics).splitlines()
        return float(next((line.split()[-1] for line in lines if line.startswith(name + " ")), "nan"))

    batches = counter("mtptune_batches_total") - counter("mtptune_batches_total", warm)
    forward_s = counter("mtptune_forward_seconds_sum") - counter("mtptune_forward_seconds_sum", warm)

    server_tps, direct_tps = tokens / server_s, tokens / direct_s
    print(
        json.dumps(
            {
                "benchmark": "serve_throughput",
                "device": "cpu",
                "torch_threads": torch.get_num_threads(),
                "concurrency": args.concurrency,
                "in_flight": in_flight,
                "batch_window_ms": args.batch_window_ms,
                "requests": args.requests,
                "prompt_len": args.prompt_len,
                "hidden_size": spec.hidden_size,
                "layers": spec.num_hidden_layers,
                "server_tokens_per_s": round(server_tps, 1),
                "direct_tokens_per_s": round(direct_tps, 1),
                "overhead": round(1 - server_tps / direct_tps, 4),
                "server_batches": int(batches),
                "mean_batch_rows": round(args.requests / batches, 2),
                "server_forward_s": round(forward_s, 2),
                "server_wall_s": round(server_s, 2),
                "direct_s": round(direct_s, 2),
                "failed": failed,
            }
        )
    )


if __name__ == "__main__":
    main()
