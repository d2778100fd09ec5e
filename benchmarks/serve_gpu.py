"""Built-in hidden-state server on a GPU: prompt tokens/s of a Qwen3.5-9B-shaped verifier at concurrency 32, against
the compute floor. Prints ONE JSON line.

Writes a config-only verifier folder (the text config of benchmarks/peer/make_fake_verifier.py: hidden 4096, 32
layers 3 linear : 1 full attention, vocab 248,320, untied), starts `mtptune serve MODEL --engine builtin
--load-format dummy --device cuda --dtype bfloat16` as a subprocess, and sends --requests seeded token-id prompts
(GSM8K-like lengths, uniform in [--min-len, --max-len]; `--long`: up to 1500) through the trainer's own
`HiddenStatesClient`: real HTTP, layer id N (the pre-final-norm residual the trainer asks for), lock, read,
validation, delete. Reported next to it:

- the FLOP floor: 2 x decoder parameters (embeddings and LM head excluded) x prompt tokens, + the LM head on each
  request's last token, + causal attention of the full-attention layers per request (QK^T and AV, T(T+1)/2 pairs),
  + an estimate of the chunked Gated DeltaNet layers (per token and value head ~6 dk dv for the state terms and
  4 C (dk + dv) for the chunk-local ones, C = 64, + the causal conv), over the bf16 matmul rate measured in this
  process (8192^3, median of 10) before the server starts; `fraction_of_peak` = achieved / floor tokens/s;
- the server's own view from /metrics: forwards, mean rows per forward, padding fraction, time inside forwards;
- `direct_tokens_per_s`: the same prompts through `VerifierRuntime.capture` in this process (after the server has
  stopped), in rounds of --concurrency prompts split by the server's own planner, i.e. the forwards alone.

    python benchmarks/serve_gpu.py                       # H100: 256 prompts of 100-600 tokens
    python benchmarks/serve_gpu.py --long                # 100-1500 tokens
    OMP_NUM_THREADS=1 python benchmarks/serve_gpu.py --tiny   # CPU smoke run, tiny Qwen3.5, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from matmul_peak import matmul_rate  # this folder (the script's own) is on sys.path

from mtptune.serving.client import HiddenStatesClient
from mtptune.serving.request_batching import plan_forwards
from mtptune.serving.server_config import ServerConfig, free_port
from mtptune.serving.verifier_runtime import VerifierRuntime

HERE = Path(__file__).resolve().parent
QWEN35_9B = dict(hidden=4096, intermediate=12288, layers=32, heads=16, kv_heads=4, head_dim=256, vocab=248320,
                 lin_head_dim=128, lin_k_heads=16, lin_v_heads=32)  # fmt: skip
TINY = dict(
    hidden=128,
    intermediate=256,
    layers=8,
    heads=4,
    kv_heads=2,
    head_dim=64,
    vocab=4096,
    lin_head_dim=32,
    lin_k_heads=2,
    lin_v_heads=4,
)  # fmt: skip  (make_fake_verifier.py --tiny)
GDN_CHUNK = 64  # chunk size of the chunked delta-rule kernels (FLA and transformers' torch fallback)


def write_config_only_verifier(out: Path, dims: dict) -> dict:
    """config.json of a Qwen3.5 ConditionalGeneration checkpoint, exactly as make_fake_verifier.py writes it."""
    spec = importlib.util.spec_from_file_location("make_fake_verifier", HERE / "peer" / "make_fake_verifier.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    text = fake.text_config(SimpleNamespace(**dims))
    config = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "image_token_id": 248056,
        "video_token_id": 248057,
        "vision_start_token_id": 248053,
        "vision_end_token_id": 248054,
        "tie_word_embeddings": False,
        "transformers_version": "4.57.0.dev0",
        "text_config": text,
        "vision_config": {
            "model_type": "qwen3_5_vision",
            "depth": 27,
            "hidden_size": 1152,
            "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": 4304,
            "num_heads": 16,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": dims["hidden"],
            "num_position_embeddings": 2304,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return text


def capture_flops(lengths: list[int], text: dict) -> dict[str, float]:
    """FLOPs a capture forward must do for these prompts (no padding), by part."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(text["model_type"], **{k: v for k, v in text.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    decoder = sum(
        p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name
    )
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    layer_types = text["layer_types"]
    n_full = layer_types.count("full_attention")
    n_linear = layer_types.count("linear_attention")
    tokens = sum(lengths)
    dk, dv = text["linear_key_head_dim"], text["linear_value_head_dim"]
    v_heads, k_heads = text["linear_num_value_heads"], text["linear_num_key_heads"]
    conv_channels = 2 * k_heads * dk + v_heads * dv
    per_token_linear = (
        v_heads * (6 * dk * dv + 4 * GDN_CHUNK * (dk + dv)) + 2 * text["linear_conv_kernel_dim"] * conv_channels
    )
    per_pair_attn = 2 * 2 * text["num_attention_heads"] * text["head_dim"]  # QK^T + AV, one (query, key) pair
    return {
        "dense": 2.0 * decoder * tokens,
        "lm_head_last_token": 2.0 * vocab * hidden * len(lengths),
        "full_attention": float(n_full * per_pair_attn * sum(t * (t + 1) // 2 for t in lengths)),
        "linear_attention_est": float(n_linear * per_token_linear * tokens),
        "decoder_params": float(decoder),
    }


def mean_of(delta, histogram: str, labels: str = "") -> float | None:
    count = delta(f"{histogram}_count{labels}")
    return round(delta(f"{histogram}_sum{labels}") / count, 4) if count == count and count else None


def gc_delta(before: str, after: str, field: str, generation: int) -> float:
    """The timed pass's garbage-collection seconds or count of one generation (a series appears at its first one)."""
    name = f'mtptune_gc_pause_seconds_{field}{{generation="{generation}"}}'
    return counter(after, name, 0.0) - counter(before, name, 0.0)


def counter(text: str, name: str, missing: float = float("nan")) -> float:
    return float(next((line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")), missing))


def start_server(cmd: list[str], log_path: Path, timeout: float) -> tuple[subprocess.Popen, str, float]:
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - start > timeout:
            proc.kill()
            raise SystemExit(f"server did not start; {shlex.join(cmd)}\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def stop_server(server: subprocess.Popen, profiled: bool) -> None:
    if profiled:  # the profiler writes its output on SIGINT, then its child (the server) goes with it
        server.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=120)
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


ISSUE_LINE = re.compile(
    r"capture (\d+) x (\d+) \((\d+) tokens\): issued in ([\d.]+) ms \(([\d.]+) ms on CPU\), device done ([\d.]+) ms"
)


def issue_summary(log_text: str, forwards: int) -> dict:
    """Mean host issue time, the launching thread's CPU time within it, and the device time after, over the last
    `forwards` capture forwards of a `--debug` server log (the timed pass)."""
    rows = [tuple(map(float, m.groups())) for m in ISSUE_LINE.finditer(log_text)][-forwards:] if forwards else []
    if not rows:
        return {}
    n = len(rows)
    return {
        "debug_forwards": n,
        "mean_issue_ms": round(sum(r[3] for r in rows) / n, 1),
        "mean_issue_thread_cpu_ms": round(sum(r[4] for r in rows) / n, 1),
        "mean_device_after_issue_ms": round(sum(r[5] for r in rows) / n, 1),
    }


def run_direct(model_dir: Path, layer: int, args: argparse.Namespace, prompts: list[list[int]], budget: int) -> dict:
    """The prompts through VerifierRuntime.capture in this process, rounds of --concurrency split by the planner
    with the server's default split cost and rows cap for this device (--server-args overrides are not mirrored)."""
    runtime = VerifierRuntime.load(str(model_dir), [layer], device=args.device, dtype=args.dtype, load_format="dummy")
    defaults = ServerConfig(str(model_dir), (layer,), Path(tempfile.gettempdir()))
    device_type = runtime.device.type
    overhead, max_rows = defaults.overhead_tokens_for(device_type), defaults.batch_rows_for(device_type)
    rounds = [prompts[i : i + args.concurrency] for i in range(0, len(prompts), args.concurrency)]
    forwards = [
        [r[i] for i in run] for r in rounds for run in plan_forwards([len(p) for p in r], budget, overhead, max_rows)
    ]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for batch in forwards[: max(1, len(forwards) // 4)]:  # warm-up: kernels compiled/tuned, allocator grown
        runtime.capture(batch)
    sync()
    start = time.perf_counter()
    for batch in forwards:
        runtime.capture(batch)
    sync()
    seconds = time.perf_counter() - start
    padded = sum(len(b) * max(len(p) for p in b) for b in forwards)
    tokens = sum(len(p) for p in prompts)
    del runtime
    return {"seconds": seconds, "forwards": len(forwards), "padding": 1 - tokens / padded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="timed prompts (256; --tiny 64)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=600)
    parser.add_argument("--long", action="store_true", help="prompt lengths up to 1500 tokens")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="prompts sent (and timed apart) before the measured pass (default: as many as --requests; --tiny 1 x "
        "concurrency). flash-linear-attention autotunes some kernels per batch size on first sight, ~1 s each; "
        "a long-running server pays that once per shape, the warm-up pass pays it here",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen3.5 on the CPU (development)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="server budget (default: its own)")
    parser.add_argument(
        "--server-args",
        default="",
        help="extra `mtptune serve` flags; write it with '=': --server-args='--batch-window-ms 5'",
    )
    parser.add_argument("--server-debug", action="store_true", help="`mtptune --debug serve`: a log line per forward")
    parser.add_argument("--matmul-size", type=int, default=None, help="peak-rate matmul n (8192; --tiny 1024)")
    parser.add_argument("--no-direct", dest="direct", action="store_false", help="skip the in-process forwards")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server.log)")
    parser.add_argument("--server-log", type=Path, default=None, help="copy the server's log here")
    parser.add_argument(
        "--server-prefix",
        default="",
        help="a command the server runs under, e.g. a profiler: --server-prefix='py-spy record -o F --idle --'; "
        "stopped with SIGINT (so it writes its output) before the server is terminated",
    )
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.requests = args.requests or (64 if args.tiny else 256)
    if args.long:
        args.max_len = max(args.max_len, 1500)
    dims = TINY if args.tiny else QWEN35_9B
    matmul_n = args.matmul_size or (1024 if args.tiny else 8192)
    dtype = getattr(torch, args.dtype)

    work = Path(tempfile.mkdtemp(prefix="mtptune-serve-gpu-"))
    shm = Path("/dev/shm")  # RAM-backed, as the trainer's default storage
    storage = Path(tempfile.mkdtemp(prefix="mtptune-serve-gpu-hs-", dir=shm if shm.is_dir() else work))
    model_dir = work / "verifier"
    text = write_config_only_verifier(model_dir, dims)
    layer = text["num_hidden_layers"]  # id N: the pre-final-norm residual (MTP's input)
    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.requests,), generator=gen).tolist()
    prompts = [torch.randint(0, text["vocab_size"] - 1, (n,), generator=gen).tolist() for n in lengths]
    warm_n = args.warmup if args.warmup is not None else (args.concurrency if args.tiny else args.requests)
    warm_lengths = torch.randint(args.min_len, args.max_len + 1, (warm_n,), generator=gen).tolist()
    warm = [torch.randint(0, text["vocab_size"] - 1, (n,), generator=gen).tolist() for n in warm_lengths]

    peak = matmul_rate(args.device, matmul_n, dtype)

    debug = ["--debug"] if args.server_debug else []
    cmd = [sys.executable, "-m", "mtptune.cli.main", *debug, "serve", str(model_dir), "--engine", "builtin",
           "--load-format", "dummy", "--device", args.device, "--dtype", args.dtype, "--target-layer-ids", str(layer),
           "--port", str(free_port()), "--hidden-states-path", str(storage)]  # fmt: skip
    if args.max_batch_tokens is not None:
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    cmd += shlex.split(args.server_args)
    cmd = shlex.split(args.server_prefix) + cmd
    server, base, startup_s = start_server(cmd, work / "server.log", args.startup_timeout)
    try:
        client = HiddenStatesClient(
            [base], model_id=str(model_dir), num_layers=1, hidden_size=text["hidden_size"],
            concurrency=args.concurrency, on_generate="delete",
        )  # fmt: skip
        with client:
            warm_start = time.perf_counter()
            warm_results = list(client.iter_fetch(enumerate(warm), prefetch=2 * args.concurrency))
            warm_s = time.perf_counter() - warm_start
            warm_failed = sum(isinstance(r, Exception) for _, r in warm_results)
            before = httpx.get(base + "/metrics").text
            start = time.perf_counter()
            results = list(client.iter_fetch(enumerate(prompts), prefetch=2 * args.concurrency))
            wall = time.perf_counter() - start
            after = httpx.get(base + "/metrics").text
        failed = [r for _, r in results if isinstance(r, Exception)]
    finally:
        stop_server(server, profiled=bool(args.server_prefix))
    budget = args.max_batch_tokens or counter(after, "mtptune_max_batch_tokens")
    budget = int(budget) if budget == budget else 8192  # servers before the gauge: their fixed default

    def delta(name: str) -> float:
        return counter(after, name) - counter(before, name)

    tokens = sum(lengths)
    flops = capture_flops(lengths, text)
    total_flops = sum(v for k, v in flops.items() if k != "decoder_params")
    floor_tps = tokens / (total_flops / peak)
    server_tps = tokens / wall
    forwards, rows = delta("mtptune_batches_total"), delta("mtptune_batched_requests_total")
    batched, padded = delta("mtptune_batched_tokens_total"), delta("mtptune_padded_tokens_total")
    if batched != batched:  # a server from before batched_tokens_total: all its capture tokens are ours
        batched = delta("mtptune_prompt_tokens_total")
    forward_s = delta("mtptune_forward_seconds_sum")
    out = {
        "benchmark": "serve_gpu",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fla": importlib.util.find_spec("fla") is not None,
        "model": "tiny-qwen3_5" if args.tiny else "qwen3_5-9b-shaped (random weights)",
        "decoder_params": int(flops["decoder_params"]),
        "dtype": args.dtype,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "prompt_len_min_mean_max": [min(lengths), round(tokens / len(lengths), 1), max(lengths)],
        "prompt_tokens": tokens,
        "max_batch_tokens": budget,
        "server_startup_s": round(startup_s, 1),
        "wall_s": round(wall, 3),
        "server_tokens_per_s": round(server_tps, 1),
        "matmul_tflops": round(peak / 1e12, 2),
        "flops_per_token": round(total_flops / tokens / 1e9, 3),
        "flops_parts_tflop": {k: round(v / 1e12, 4) for k, v in flops.items() if k != "decoder_params"},
        "floor_tokens_per_s": round(floor_tps, 1),
        "fraction_of_peak": round(server_tps / floor_tps, 4),
        "server_forwards": int(forwards),
        "mean_rows_per_forward": round(rows / forwards, 2) if forwards else None,
        "mean_tokens_per_forward": round(batched / forwards, 1) if forwards else None,
        "padding_fraction": round(1 - batched / padded, 4) if padded else None,
        "server_forward_s": round(forward_s, 3),
        "server_busy_fraction": round(forward_s / wall, 4),
        "server_forward_tokens_per_s": round(batched / forward_s, 1) if forward_s else None,
        # Where a capture request's time goes besides its forward (servers from before these histograms: None).
        "mean_queue_wait_s": mean_of(delta, "mtptune_queue_wait_seconds"),
        "mean_file_write_s": mean_of(delta, "mtptune_file_write_seconds"),
        # The server's view of a capture request (arrival to answer); the client's cycle is concurrency x wall /
        # requests, the rest of it is HTTP and the client itself.
        "mean_request_latency_s": mean_of(delta, "mtptune_request_latency_seconds", '{endpoint="/v1/completions"}'),
        "client_cycle_s": round(args.concurrency * wall / len(prompts), 4),
        "gc_pause_s": {g: round(gc_delta(before, after, "sum", g), 4) for g in range(3)},
        "gc_collections": {g: int(gc_delta(before, after, "count", g)) for g in range(3)},
        "failed": len(failed),
        "warmup_failed": warm_failed,
        "warmup_prompts": warm_n,
        "warmup_tokens_per_s": round(sum(warm_lengths) / warm_s, 1),
    }
    if failed:
        out["first_error"] = str(failed[0])[:300]
    if args.server_debug:
        out.update(issue_summary((work / "server.log").read_text(), int(forwards)))
    if args.direct:
        direct = run_direct(model_dir, layer, args, prompts, budget)
        out.update(
            direct_tokens_per_s=round(tokens / direct["seconds"], 1),
            direct_fraction_of_peak=round(tokens / direct["seconds"] / floor_tps, 4),
            direct_forwards=direct["forwards"],
            direct_padding_fraction=round(direct["padding"], 4),
            server_overhead=round(1 - direct["seconds"] / wall, 4),
        )
    shutil.rmtree(storage, ignore_errors=True)
    if args.server_log is not None:
        shutil.copyfile(work / "server.log", args.server_log)
    if args.keep:
        out["work"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
