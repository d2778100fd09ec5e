"""The hidden-state request path on a CPU box: mtptune's real server and client, with the GPU forward emulated.

Everything around the forward is the real thing: `HiddenStatesServer` (FastAPI/uvicorn, dynamic batching, the
length planner, `.lock` + safetensors files in /dev/shm) in a subprocess, and the trainer's `HiddenStatesClient`
(HTTP, lock wait, read, validation, delete) at --concurrency. Only `VerifierRuntime.capture` is replaced by a sleep
that follows the cost the H200 server measured for a Qwen3.5-9B-shaped verifier (docs/benchmarks.md 8.2, session 5):
the host needs ~125 ms to launch a forward whatever its size, and the GPU ~25 us per padded token, so a forward takes
max(--launch-ms, --us-per-token x padded tokens). The sleep releases the GIL as a waiting GPU forward does.

Use it to see what the request path costs (client cycle, queue wait, rows per forward) when the forward is not the
question, and to compare client/server changes without a GPU. It says nothing about the forward itself. Prints ONE
JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_emulated.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_emulated.py --launch-ms 60   # a server launching 2x faster
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402  (after the path insert)
import torch  # noqa: E402
from serve_gpu import counter, mean_of, start_server, stop_server  # noqa: E402  (this folder)

from mtptune.serving.client import HiddenStatesClient  # noqa: E402
from mtptune.serving.contract import CaptureSpec  # noqa: E402
from mtptune.serving.server_config import ServerConfig, free_port  # noqa: E402
from mtptune.serving.verifier_runtime import Capture  # noqa: E402

VOCAB = 1000


class EmulatedRuntime:
    """What HiddenStatesServer needs of a VerifierRuntime, with a forward that only takes the measured time."""

    device = torch.device("cuda")  # the server's GPU batching defaults (budget, rows cap, split cost)
    vocab_size = VOCAB
    eos_token_ids = (0,)
    tokenizer = None
    layer_ids = (32,)  # one captured layer (the server sizes each capture file from these three)
    spec = CaptureSpec(layer_ids, 32)  # layer 32 of 32: the pre-final-norm residual
    dtype = torch.bfloat16

    def __init__(self, hidden_size: int, launch_s: float, s_per_token: float) -> None:
        self.hidden_size, self.launch_s, self.s_per_token = hidden_size, launch_s, s_per_token
        text = SimpleNamespace(max_position_embeddings=8192)
        self.model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))

    def capture(self, sequences: list[list[int]]) -> list[Capture]:
        padded = len(sequences) * max(len(s) for s in sequences)
        time.sleep(max(self.launch_s, self.s_per_token * padded))
        states = torch.ones(sum(len(s) for s in sequences), 1, self.hidden_size, dtype=torch.bfloat16)
        logits = torch.zeros(len(sequences), VOCAB)
        captures, offset = [], 0
        for row, seq in enumerate(sequences):
            captures.append(Capture(states[offset : offset + len(seq)], logits[row]))
            offset += len(seq)
        return captures


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from mtptune.serving.server import HiddenStatesServer

    torch.set_num_threads(1)
    config = ServerConfig(
        "emulated", (32,), Path(args.storage), port=args.port, device="cuda", batch_overhead_tokens=args.overhead_tokens
    )
    runtime = EmulatedRuntime(args.hidden_size, args.launch_ms / 1e3, args.us_per_token / 1e6)
    uvicorn.run(HiddenStatesServer(config, runtime).build_app(), port=args.port, log_level="warning")  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=320, help="timed requests (after a warm-up of 64)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=101)
    parser.add_argument("--max-len", type=int, default=599)
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--launch-ms", type=float, default=125.0, help="host time to launch one forward")
    parser.add_argument("--us-per-token", type=float, default=25.0, help="GPU time per padded token")
    parser.add_argument(
        "--prefetch", type=int, default=None, help="rows submitted ahead (default: the client's, 2 x concurrency)"
    )
    parser.add_argument("--overhead-tokens", type=int, default=None, help="the server's --batch-overhead-tokens")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server subprocess
    parser.add_argument("--storage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return

    shm = Path("/dev/shm")
    storage = Path(tempfile.mkdtemp(prefix="mtptune-emulated-hs-", dir=shm if shm.is_dir() else None))
    cmd = [sys.executable, __file__, "--serve", "--storage", str(storage), "--port", str(free_port()),
           "--hidden-size", str(args.hidden_size), "--launch-ms", str(args.launch_ms),
           "--us-per-token", str(args.us_per_token)]  # fmt: skip
    if args.overhead_tokens is not None:
        cmd += ["--overhead-tokens", str(args.overhead_tokens)]
    server, base, _ = start_server(cmd, storage / "server.log", timeout=120)
    try:
        rng = random.Random(0)
        prompts = [
            [rng.randint(1, VOCAB - 1) for _ in range(rng.randint(args.min_len, args.max_len))]
            for _ in range(64 + args.requests)
        ]
        with HiddenStatesClient(
            [base], model_id="emulated", num_layers=1, hidden_size=args.hidden_size, concurrency=args.concurrency
        ) as client:
            list(client.iter_fetch(enumerate(prompts[:64]), prefetch=args.prefetch))
            before = httpx.get(base + "/metrics").text
            start = time.perf_counter()
            results = list(client.iter_fetch(enumerate(prompts[64:]), prefetch=args.prefetch))
            wall = time.perf_counter() - start
            after = httpx.get(base + "/metrics").text
    finally:
        stop_server(server, profiled=False)
        shutil.rmtree(storage, ignore_errors=True)

    def delta(name: str) -> float:
        return counter(after, name) - counter(before, name)

    rows, forwards = delta("mtptune_batched_requests_total"), delta("mtptune_batches_total")
    tokens = sum(len(p) for p in prompts[64:])
    print(
        json.dumps(
            {
                "benchmark": "serve_emulated",
                "launch_ms": args.launch_ms,
                "us_per_token": args.us_per_token,
                "concurrency": args.concurrency,
                "requests": args.requests,
                "cpus": os.cpu_count(),
                "tokens_per_s": round(tokens / wall, 1),
                "rows_per_forward": round(rows / forwards, 2),
                "padding_fraction": round(
                    1 - delta("mtptune_batched_tokens_total") / delta("mtptune_padded_tokens_total"), 4
                ),
                "mean_forward_s": round(delta("mtptune_forward_seconds_sum") / forwards, 4),
                "mean_queue_wait_s": mean_of(delta, "mtptune_queue_wait_seconds"),
                "mean_server_latency_s": mean_of(
                    delta, "mtptune_request_latency_seconds", '{endpoint="/v1/completions"}'
                ),
                "client_cycle_s": round(args.concurrency * wall / args.requests, 4),
                "failed": sum(isinstance(r, Exception) for _, r in results),
            }
        )
    )


if __name__ == "__main__":
    main()
