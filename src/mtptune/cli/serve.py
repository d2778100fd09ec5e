"""`mtptune serve MODEL [--target-layer-ids I ...] [--engine auto|vllm|builtin] -- <engine args>`.

`vllm` execs the exact `vllm serve` command of a hidden-state extraction server (docs/contracts.md, "Launching vLLM"); `builtin` runs
mtptune's own server, which speaks the same protocol on CPU or one GPU; `auto` picks vLLM when it is importable
and CUDA is available. The speculators `launch_vllm` flags are accepted (docs/contracts.md, "Commands and flags").
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from collections.abc import Sequence

from mtptune.cli.arg_types import non_negative_float, non_negative_int, positive_float, positive_int
from mtptune.errors import ConfigError
from mtptune.serving.warmup_record import WARMUP_MODES

log = logging.getLogger(__name__)

# vLLM flags the built-in engine understands when given after `--` (so `-- --port 8000` works for both engines).
_BUILTIN_ENGINE_FLAGS = {
    "--host": "host",
    "--port": "port",
    "--api-key": "api_key",
    "--served-model-name": "served_model_name",
    "--max-model-len": "max_model_len",
    "--max-num-batched-tokens": "max_batch_tokens",
    "--max-num-seqs": "max_generate_batch",
    "--dtype": "dtype",
    "--device": "device",
    "--tokenizer": "tokenizer",
    "--load-format": "load_format",
}


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target-layer-ids",
        type=int,
        nargs="+",
        default=None,
        metavar="I",
        help="layers to capture (vLLM ids: 0 = embeddings, N = last layer before the final norm); default: N (MTP)",
    )
    last = parser.add_mutually_exclusive_group()
    last.add_argument(
        "--include-last-layer", dest="include_last_layer", action="store_true", default=True, help="append N (default)"
    )
    last.add_argument("--no-include-last-layer", dest="include_last_layer", action="store_false")
    parser.add_argument("--engine", choices=("auto", "vllm", "builtin"), default="auto")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000)")
    parser.add_argument("--hidden-states-path", default=None, help="storage dir shared with the trainer")
    parser.add_argument(
        "--hidden-states-backend",
        choices=("file", "mooncake"),
        default="file",
        help="vllm: where the connector puts the states; `mtptune train` reads `file` (mooncake: other consumers)",
    )
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1")
    parser.add_argument("--served-model-name", default=None, help="model id reported by /v1/models (default MODEL)")
    parser.add_argument("--max-model-len", type=positive_int, default=None)
    parser.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=None,
        help="builtin: padded tokens per capture forward (default 16384 on a GPU, 8192 on CPU); vllm: "
        "--max-num-batched-tokens",
    )
    parser.add_argument(
        "--max-generate-batch-tokens",
        type=positive_int,
        default=None,
        help="builtin: padded slots per batched generation decode, rows x (longest prompt + largest max_tokens) "
        "(default 65536); with --max-num-seqs (after --) it bounds the rows decoded together",
    )
    parser.add_argument("--device", default=None, help="builtin: torch device (default cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="auto (checkpoint dtype), bfloat16, float16, float32")
    parser.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        default=None,
        help="auto: read the checkpoint; dummy: random weights built from config.json alone (benchmarks; "
        "same meaning as vLLM's --load-format dummy, passed through to vllm)",
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder (default: MODEL; vllm: a MODEL folder without tokenizer files is served with "
        "--skip-tokenizer-init, token-id prompts only)",
    )
    parser.add_argument(
        "--allow-custom-save-path",
        action="store_true",
        help="let a request choose its file via kv_transfer_params.hidden_states_path (builtin: inside the storage "
        "dir; vllm: the connector's allow_custom_save_path, anywhere the server may write)",
    )
    parser.add_argument(
        "--batch-window-ms", type=non_negative_float, default=2.0, help="builtin: wait this long to fill a batch"
    )
    parser.add_argument(
        "--batch-overhead-tokens",
        type=non_negative_int,
        default=None,
        help="builtin: split waiting requests into more, less padded forwards only when that saves more than this "
        "many padded tokens per extra forward (default 2048 on GPU, 1024 on CPU)",
    )
    parser.add_argument(
        "--max-batch-rows",
        type=positive_int,
        default=None,
        help="builtin: requests per capture forward (default 64 on a GPU, unbounded on CPU)",
    )
    parser.add_argument(
        "--kernel-warmup",
        choices=WARMUP_MODES,
        default="auto",
        help="builtin, GPU: run one start-up forward per batch size 1..--max-batch-rows and per 2k-token block "
        "(flash-linear-attention autotunes per batch size; without the warm-up live requests pay ~1 s per new "
        "size). auto (default): unless it already ran on this machine with the same verifier architecture and "
        "kernels, whose compiled kernels and tunings Triton's cache then holds",
    )
    parser.add_argument(
        "--no-kernel-warmup", dest="kernel_warmup", action="store_const", const="never", help="= --kernel-warmup never"
    )
    parser.add_argument(
        "--cudnn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="builtin, GPU: let cuDNN run the verifier's attention and causal convolutions (default off: cuDNN's "
        "attention builds an execution plan for every new input shape, ~6 ms of host time per layer, and a server "
        "sees a new prompt width in most forwards; without it SDPA uses flash attention, as vLLM does)",
    )
    parser.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="builtin: after start-up, move every live object (model, modules, libraries) out of Python's garbage "
        "collector, as vLLM does, so that a full collection does not walk them and stall the thread launching a "
        "forward",
    )
    parser.add_argument(
        "--cpu-threads",
        type=positive_int,
        default=None,
        help="builtin: torch's CPU threads (default on a GPU: 1, as vLLM does, unless OMP_NUM_THREADS is set: the "
        "server's CPU work is small copies, and idle OpenMP workers compete with the thread that launches the "
        "forward; on CPU: all cores)",
    )
    parser.add_argument("--max-queue", type=positive_int, default=1024, help="builtin: queued requests before 503")
    parser.add_argument(
        "--default-max-tokens",
        type=positive_int,
        default=1024,
        help="builtin: tokens generated for a request that sets no max_tokens (a chat request without it, or "
        "max_tokens null; /v1/completions keeps OpenAI's 16), capped by the context left (default 1024)",
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        default=4096,
        help="builtin: the largest max_tokens a request may ask for; more is a 400 (default 4096)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=64 * 1024 * 1024,
        help="builtin: largest request body, counted on the bytes read (chunked bodies too); more is a 413 "
        "(default 64 MiB)",
    )
    parser.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="builtin: render a chat template sent with a request (`chat_template`, or `chat_template_kwargs."
        "chat_template`); without it such a request is a 400, as in vLLM. A template is a program: trust your clients",
    )
    parser.add_argument(
        "--chat-template-timeout",
        type=positive_float,
        default=10.0,
        help="builtin: seconds a chat template's rendering (or a text prompt's tokenization) may take, off the event "
        "loop; longer is a 400 and the rendering is stopped (default 10)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command / settings and exit")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="start a hidden-state server (vLLM or built-in)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="verifier folder or hub id; also the served model id")
    add_serve_options(parser)
    # argparse cannot split "MODEL --flags -- engine args" across a subparser; take the rest raw and split it
    # at the first `--` in run().
    parser.add_argument("engine_args", nargs=argparse.REMAINDER, help="[--flags] -- args passed to `vllm serve`")
    parser.set_defaults(func=run)


def split_engine_args(args: argparse.Namespace) -> argparse.Namespace:
    """Parse our flags given after MODEL (they land in the raw remainder) and keep what follows `--`."""
    raw = list(args.engine_args or [])
    cut = raw.index("--") if "--" in raw else len(raw)
    ours, engine = raw[:cut], raw[cut + 1 :]
    if ours:
        options = _FlagParser(prog="mtptune serve MODEL", add_help=False)
        add_serve_options(options)
        options.parse_args(ours, namespace=args)
    args.engine_args = engine
    return args


class _FlagParser(argparse.ArgumentParser):
    """Raises argparse's own reason (`argument --max-queue: must be ...`) as a ConfigError instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"cannot parse serve flags: {message} (engine args go after `--`).")


def pick_engine(engine: str) -> str:
    if engine != "auto":
        return engine
    if importlib.util.find_spec("vllm") is None:
        return "builtin"
    import torch

    return "vllm" if torch.cuda.is_available() else "builtin"


def run(args: argparse.Namespace) -> int:
    from mtptune.serving.contract import model_capture_spec
    from mtptune.serving.server_config import default_hidden_states_path

    args = split_engine_args(args)
    layer_ids = list(model_capture_spec(args.model, args.target_layer_ids, args.include_last_layer).layer_ids)
    storage = args.hidden_states_path or str(default_hidden_states_path())
    engine = pick_engine(args.engine)
    if engine == "vllm":
        return _run_vllm(args, layer_ids, storage)
    return _run_builtin(args, layer_ids, storage)


def _run_vllm(args: argparse.Namespace, layer_ids: list[int], storage: str) -> int:
    from pathlib import Path

    from mtptune.serving.vllm_command import (
        VllmServeSpec,
        build_vllm_command,
        default_kv_cache_bytes,
        exec_command,
        format_command,
        is_vllm_cpu_build,
    )

    spec = VllmServeSpec(
        model=args.model,
        layer_ids=layer_ids,
        # vLLM joins this with each request id and returns the result as the file's path: a relative storage dir
        # would give the trainer paths relative to the server's working directory, not its own.
        hidden_states_path=str(Path(storage).expanduser().resolve()),
        backend=args.hidden_states_backend,
        host=args.host or "127.0.0.1",
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        max_batch_tokens=args.max_batch_tokens,
        dtype=args.dtype,
        load_format=args.load_format,
        trust_remote_code=args.trust_remote_code,
        tokenizer=args.tokenizer,
        allow_custom_save_path=args.allow_custom_save_path,
        kv_cache_memory_bytes=default_kv_cache_bytes(is_vllm_cpu_build()),
        engine_args=list(args.engine_args),
    )
    argv = build_vllm_command(spec)
    if args.hidden_states_backend == "mooncake":
        log.warning(
            "--hidden-states-backend mooncake: vLLM puts the hidden states into a Mooncake store for other consumers "
            "(hs-connectors); `mtptune train` reads files and stops at the first row against this server."
        )
    if args.dry_run:
        print(format_command(argv))
        return 0
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--engine vllm: vllm is not installed in this environment; use --engine builtin.")
    log.info("exec %s", format_command(argv))
    exec_command(argv)
    return 0  # not reached


def builtin_overrides(engine_args: Sequence[str]) -> dict[str, str]:
    """Map the vLLM flags the built-in engine understands; refuse the rest with a clear message."""
    out: dict[str, str] = {}
    i = 0
    args = list(engine_args)
    while i < len(args):
        flag, value = args[i], None
        if "=" in flag:
            flag, value = flag.split("=", 1)
        name = _BUILTIN_ENGINE_FLAGS.get(flag.replace("_", "-"))
        if flag in (
            "--trust-remote-code",
            "--no-enable-chunked-prefill",
            "--no-enable-prefix-caching",
            "--enforce-eager",
        ):
            out[flag] = "true"
            i += 1
            continue
        if name is None:
            raise ConfigError(
                f"engine arg {args[i]!r} is not understood by the built-in engine (it understands "
                f"{', '.join(sorted(_BUILTIN_ENGINE_FLAGS))}); drop it or use --engine vllm."
            )
        if value is None:
            if i + 1 >= len(args):
                raise ConfigError(f"engine arg {flag} needs a value.")
            value = args[i + 1]
            i += 1
        out[name] = value
        i += 1
    return out


def _run_builtin(args: argparse.Namespace, layer_ids: list[int], storage: str) -> int:
    from pathlib import Path

    from mtptune.serving.server_config import LOAD_FORMATS, ServerConfig

    if args.hidden_states_backend != "file":
        raise ConfigError(
            f"--hidden-states-backend {args.hidden_states_backend}: the built-in engine writes files (the default "
            "`file`); a Mooncake store needs --engine vllm with hs-connectors installed."
        )
    over = builtin_overrides(list(args.engine_args))
    if over.get("load_format", "auto") not in LOAD_FORMATS:
        raise ConfigError(
            f"--load-format {over['load_format']!r}: the built-in engine knows {', '.join(LOAD_FORMATS)}; "
            "use --engine vllm for other formats."
        )

    def pick(name: str, default, cast=str):
        value = getattr(args, name, None)
        if value is None and name in over:
            try:
                value = cast(over[name])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"engine arg for {name}: {over[name]!r} is not a valid value ({exc}).") from exc
        return default if value is None else value

    config = ServerConfig(
        model=args.model,
        layer_ids=tuple(layer_ids),
        storage_dir=Path(storage),
        served_model_name=pick("served_model_name", None),
        host=pick("host", "127.0.0.1"),
        port=pick("port", 8000, int),
        api_key=pick("api_key", None),
        allow_custom_save_path=args.allow_custom_save_path,
        max_model_len=pick("max_model_len", None, positive_int),
        max_batch_tokens=pick("max_batch_tokens", None, positive_int),
        max_generate_batch=pick("max_generate_batch", 32, positive_int),
        max_generate_batch_tokens=pick("max_generate_batch_tokens", 65536, positive_int),
        batch_window_ms=args.batch_window_ms,
        batch_overhead_tokens=args.batch_overhead_tokens,
        max_batch_rows=args.max_batch_rows,
        kernel_warmup=args.kernel_warmup,
        cudnn=args.cudnn,
        gc_freeze=args.gc_freeze,
        cpu_threads=args.cpu_threads,
        max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        trust_request_chat_template=args.trust_request_chat_template,
        chat_template_timeout=args.chat_template_timeout,
        device=pick("device", None),
        dtype=pick("dtype", None),
        trust_remote_code=args.trust_remote_code or "--trust-remote-code" in over,
        tokenizer=pick("tokenizer", None),
        load_format=pick("load_format", "auto"),
    )
    if args.dry_run:
        shown = {k: (str(v) if k != "api_key" or v is None else "***") for k, v in vars(config).items()}
        print("builtin server: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        return 0
    from mtptune.serving.server import serve

    serve(config)
    return 0
