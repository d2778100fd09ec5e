"""`mtptune train`: finetune the MTP head against a hidden-state server (online), a cache (hybrid) or files (offline).

Accepts the speculators tutorial command verbatim (docs/contracts.md, "Commands and flags"), e.g.

    mtptune train --verifier-name-or-path Qwen/Qwen3.5-9B --data-path ./output \\
        --vllm-endpoint http://localhost:8000/v1 --save-path ./output/checkpoints --speculator-type mtp \\
        --num-speculative-steps 3 --target-layer-ids 32 --step-weight-beta 0.6 --epochs 3 --lr 1e-4 \\
        --total-seq-len 8192 --on-missing generate --on-generate delete

Multi-GPU: the same command under `torchrun --nproc_per_node N -m mtptune.cli.main train ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import get_args

from mtptune.cli.arg_types import positive_int
from mtptune.errors import ConfigError, MtpTuneError
from mtptune.training.config import (
    CacheDevice,
    CheckpointConfig,
    CompileScope,
    DataConfig,
    DtypeName,
    HiddenStatesConfig,
    InputNormName,
    LoadFormat,
    LoggingConfig,
    LossConfig,
    LossKind,
    OnGenerate,
    OnMissing,
    OptimConfig,
    OptimizerName,
    SchedulerKind,
    TrainConfig,
)
from mtptune.training.loss_kernels import LOSS_KERNELS

# The one source of every default below: the config classes (the required fields get placeholders).
_DATA, _CKPT, _HS, _OPT = DataConfig(""), CheckpointConfig(""), HiddenStatesConfig(), OptimConfig()
_LOSS, _LOG = LossConfig(), LoggingConfig()
_TRAIN = TrainConfig("", _DATA, _CKPT)

log = logging.getLogger("mtptune.train")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="finetune the MTP head on hidden states from a server (online/hybrid) or files (offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--verifier-name-or-path", required=True, help="verifier folder or hub id (= the server's model id)")
    g.add_argument("--speculator-type", default="mtp", help="must be mtp (mtptune trains native MTP heads only)")
    g.add_argument("--from-pretrained", default=None, help="start from a head checkpoint (convert output or epoch dir)")
    g.add_argument(
        "--num-speculative-steps", type=int, default=None, help="K trained (default: the checkpoint's, or 3)"
    )
    g.add_argument("--mtp-input-norm", choices=get_args(InputNormName), default=_TRAIN.mtp_input_norm,
                   help="post_norm: head gets FinalNorm(r_t) like vLLM serves it (default); none: pre-norm A/B")  # fmt: skip
    g.add_argument("--target-layer-ids", type=int, nargs="+", default=None,
                   help="layer ids the server captures, read as `mtptune serve` reads them (N is appended unless "
                        "listed); the MTP head reads layer N")  # fmt: skip

    g = parser.add_argument_group("data and hidden states")
    g.add_argument("--data-path", default="./output", help="prepared data folder (mtptune prepare)")
    g.add_argument("--max-rows", type=int, default=None, help="use only the first N prepared rows")
    g.add_argument("--vllm-endpoint", action="append", default=None, help="OpenAI base URL incl. /v1 (repeatable)")
    g.add_argument(
        "--hidden-states-path", default=None, help="cache/offline folder (default <data-path>/hidden_states)"
    )
    g.add_argument("--on-missing", choices=get_args(OnMissing), default=_HS.on_missing)
    g.add_argument("--on-generate", choices=get_args(OnGenerate), default=_HS.on_generate)
    g.add_argument("--request-timeout", type=float, default=_HS.request_timeout)
    g.add_argument("--max-retries", type=int, default=_HS.max_retries)
    g.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=f"hidden-state requests in flight (default {_HS.concurrency}: an 8192-token step of GSM8K-length rows holds ~40 "
        "rows, and the server batches what is in flight: the more, the larger and cheaper its forwards)",
    )
    g.add_argument("--num-workers", type=int, default=None, help="speculators' spelling of --concurrency")
    g.add_argument(
        "--prefetch", type=int, default=None, help="rows fetched ahead of the step (default 2 x concurrency)"
    )
    g.add_argument(
        "--prefetch-tokens",
        type=positive_int,
        default=_HS.prefetch_tokens,
        help=f"and at most this many of their tokens (default {_HS.prefetch_tokens:,}: bounds the hidden states "
        "held ahead, ~8 KiB per token of a 4096-wide verifier; long rows would otherwise hold GiBs)",
    )
    g.add_argument("--hidden-states-dtype", choices=("bfloat16", "float16", "float32"), default=_HS.dtype)
    g.add_argument(
        "--server-wait-timeout",
        type=float,
        default=_HS.server_wait_timeout,
        help="seconds to wait for the server's GET /health at start (default 600: loading a 9B verifier, vLLM's "
        "CUDA graphs or the built-in server's kernel warm-up take minutes)",
    )
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (env OPENAI_API_KEY)")
    g.add_argument(
        "--hidden-states-memory-cache",
        type=float,
        default=_HS.memory_cache_gib,
        metavar="GIB",
        help="keep up to GIB of hidden states in memory so that epochs after the first reuse them instead of asking "
        "the server (or the colocated verifier) again; least recently used rows are dropped beyond it; 0 disables "
        "(default 16; a 9B verifier's states take ~8 KiB per token)",
    )
    g.add_argument(
        "--hidden-states-memory-cache-device",
        choices=get_args(CacheDevice),
        default=_HS.memory_cache_device,
        help="where the memory cache lives (auto: the training GPU with --colocated, host RAM otherwise)",
    )
    g.add_argument(
        "--max-failed-fraction",
        type=float,
        default=_HS.max_failed_fraction,
        metavar="F",
        help="stop the run (exit 2, a resumable interrupted/ checkpoint) when more than F of the last "
        "--failed-fraction-window rows had no usable hidden states (invalid or failed; rows missing under "
        "--on-missing skip|warn do not count); also checked at each epoch's end over what the window holds. "
        "Default 0.1; 1 never stops. Errors that every row would hit (another verifier's states, a storage folder "
        "the trainer may not read, a 4xx from the server) stop the run at the first row whatever F is",
    )
    g.add_argument(
        "--failed-fraction-window",
        type=int,
        default=_HS.failed_fraction_window,
        metavar="N",
        help="rows (training and validation, most recent) over which --max-failed-fraction is measured (default 200)",
    )
    g.add_argument(
        "--train-data-ratio", type=float, default=_DATA.train_data_ratio, help="train fraction; the tail validates"
    )
    g.add_argument(
        "--total-seq-len", type=int, default=_DATA.total_seq_len, help="packed tokens per micro-batch per rank"
    )

    g = parser.add_argument_group(
        "colocated hidden states",
        "--colocated runs the verifier's forward in this process, on the training GPU(s): no server, no HTTP, no "
        "files. Pick it when one GPU holds the verifier (bf16: 2 bytes per parameter) beside the trainer (~15 GiB "
        "for a 9B-class head at --total-seq-len 8192): it is the fastest path on one GPU. Pick a server (vLLM, "
        "--vllm-endpoint) when the verifier needs its own GPUs (tensor parallel, a larger model) or already runs.",
    )
    g.add_argument("--colocated", action="store_true", help="compute hidden states in this process (no server)")
    g.add_argument("--verifier-dtype", choices=("auto", "bfloat16", "float16", "float32"), default=_HS.verifier_dtype,
                   help="colocated verifier weights (auto: bf16 on GPU, the checkpoint's dtype on CPU)")  # fmt: skip
    g.add_argument(
        "--verifier-forward-tokens",
        type=int,
        default=None,
        help="tokens per colocated verifier forward (default 16384 on GPU, 2048 on CPU)",
    )
    g.add_argument("--verifier-load-format", choices=get_args(LoadFormat), default=_HS.verifier_load_format,
                   help="dummy: random verifier weights from config.json, for benchmarks only")  # fmt: skip

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=_TRAIN.epochs)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many global steps")
    g.add_argument("--lr", type=float, default=_OPT.lr)
    g.add_argument("--optimizer", choices=get_args(OptimizerName), default=_OPT.name,
                   help="adamw (fused), or muon: Muon for the 2-D weight matrices + AdamW for norms (speculators' default)")  # fmt: skip
    g.add_argument(
        "--muon-lr", type=float, default=None, help="Muon's lr (default --lr; its update RMS matches AdamW's)"
    )
    g.add_argument("--weight-decay", type=float, default=_OPT.weight_decay)
    g.add_argument("--grad-clip", type=float, default=_OPT.grad_clip)
    g.add_argument("--grad-accum", type=int, default=_OPT.grad_accum)
    g.add_argument("--scheduler", choices=get_args(SchedulerKind), default=_OPT.scheduler)
    g.add_argument("--warmup-steps", type=int, default=_OPT.warmup_steps)
    g.add_argument(
        "--step-weight-beta", type=float, default=_LOSS.step_weight_beta, help="FastMTP alpha_k = beta^k / sum_j beta^j"
    )
    g.add_argument("--step-weights", default=None, help="explicit per-step weights, e.g. 1,0,0 (overrides beta)")
    g.add_argument("--loss", choices=get_args(LossKind), default=_LOSS.kind)
    g.add_argument("--kl-weight", type=float, default=_LOSS.kl_weight, help="weight of kl in --loss ce+kl")
    g.add_argument("--loss-chunk-rows", type=int, default=_LOSS.chunk_rows, help="rows per chunked lm_head + loss")
    g.add_argument("--loss-kernel", choices=LOSS_KERNELS, default=_LOSS.kernel,
                   help="LM head + cross-entropy of the training steps: ours (chunked, every loss kind, any "
                        "device), liger (liger-kernel: --loss ce on CUDA; a 9B head's step 4 %% faster, 0.95 GiB "
                        "less), auto (default: liger where it can run, else ours)")  # fmt: skip
    g.add_argument("--seed", type=int, default=_TRAIN.seed)
    g.add_argument("--device", default=_TRAIN.device, help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", choices=get_args(DtypeName), default=_TRAIN.dtype,
                   help="compute dtype (auto: bf16 autocast on GPU, fp32 on CPU); master weights stay fp32")  # fmt: skip
    g.add_argument("--compile", choices=get_args(CompileScope), default=_TRAIN.compile,
                   help="on CUDA: compile each MTP step of the head into fused kernels (step, the default), only its "
                        "RMSNorms (norms) or nothing (none); the CPU always runs eager")  # fmt: skip
    g.add_argument("--no-compile", dest="compile", action="store_const", const="none", help="same as --compile none")

    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--save-path", default="./output/checkpoints")
    g.add_argument(
        "--checkpoint-freq",
        type=float,
        default=_CKPT.checkpoint_freq,
        help="in epochs; < 1 adds mid-epoch step<N>/ saves",
    )
    g.add_argument("--save-best", action="store_true", help="(always on) keep checkpoint_best -> best val tau_sim")
    g.add_argument("--no-resume", action="store_true", help="ignore checkpoints already under --save-path")
    g.add_argument(
        "--resume-with-changes",
        action="store_true",
        help="resume even though flags that change the maths (lr, schedule, epochs, loss, data, ranks ...) differ "
        "from the checkpoint's run: the new values apply from the resumed step and the changes are recorded in "
        "metrics.jsonl and run.yaml (without it such a resume is refused, listing the differences; a new K is "
        "always refused)",
    )
    g.add_argument("--val-every", type=int, default=None, help="also validate every N steps")
    g.add_argument("--no-initial-val", action="store_true", help="skip validating the untrained head")
    g.add_argument("--logger", action="append", default=None, help="tensorboard, trackio, wandb (comma list/repeat)")
    g.add_argument("--log-dir", default=None)
    g.add_argument("--run-name", default=None)
    g.add_argument(
        "--log-every",
        "--log-freq",
        type=int,
        default=_LOG.log_every,
        help=f"log training metrics every N steps (default {_LOG.log_every}). Metrics stay on the GPU in between (one device sync "
        "per logged step), and the verifier-reference metrics (acc_verifier, tau_sim) are computed on logged steps "
        "only; validation always computes them.",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_config(args: argparse.Namespace):
    """argparse namespace -> the validated TrainConfig tree (warns about flags that are inert for MTP)."""
    from mtptune.checkpoint.verifier import Verifier
    from mtptune.serving.contract import capture_spec
    from mtptune.training.build import pretrained_num_steps

    if args.speculator_type != "mtp":
        raise ConfigError(
            f"--speculator-type {args.speculator_type}: mtptune trains native MTP heads only (--speculator-type mtp); "
            "use speculators for eagle3."
        )
    verifier = Verifier.open(args.verifier_name_or_path)
    target_layer_ids = tuple(args.target_layer_ids) if args.target_layer_ids else None
    spec = capture_spec(verifier.text_config.num_hidden_layers, target_layer_ids)  # an error here, not mid-run
    if len(spec.layer_ids) > 1:
        log.info("the server captures %s; the MTP head reads layer %d.", spec.describe(), spec.num_layers)
    steps = args.num_speculative_steps
    if steps is None:
        steps = (
            pretrained_num_steps(args.from_pretrained) if args.from_pretrained else None
        ) or _TRAIN.num_speculative_steps
    if args.num_workers is not None and args.concurrency is not None and args.num_workers != args.concurrency:
        raise ConfigError("--num-workers and --concurrency disagree; --num-workers is speculators' name for it.")
    concurrency = args.concurrency or args.num_workers or _HS.concurrency
    if args.save_best:
        log.info("--save-best: checkpoint_best is always maintained (highest validation tau_sim).")
    if args.muon_lr is not None and args.optimizer != "muon":
        log.warning("--muon-lr applies to --optimizer muon only; this run uses %s.", args.optimizer)
    step_weights = None
    if args.step_weights:
        try:
            step_weights = tuple(float(x) for x in args.step_weights.split(","))
        except ValueError as exc:
            raise ConfigError(f"--step-weights {args.step_weights!r}: expected numbers like 1,0,0.") from exc
    loggers = tuple(name.strip() for item in (args.logger or []) for name in item.split(",") if name.strip())
    endpoints = tuple(args.vllm_endpoint or ())
    return TrainConfig(
        verifier=args.verifier_name_or_path,
        data=DataConfig(args.data_path, args.total_seq_len, args.train_data_ratio, args.max_rows),
        checkpoint=CheckpointConfig(
            args.save_path, args.checkpoint_freq, True, not args.no_resume, args.resume_with_changes
        ),
        hidden_states=HiddenStatesConfig(
            endpoints=endpoints,
            hidden_states_path=args.hidden_states_path,
            on_missing=args.on_missing,
            on_generate=args.on_generate,
            request_timeout=args.request_timeout,
            max_retries=args.max_retries,
            concurrency=concurrency,
            prefetch=args.prefetch or 2 * concurrency,
            prefetch_tokens=args.prefetch_tokens,
            dtype=args.hidden_states_dtype,
            target_layer_ids=target_layer_ids,
            api_key=args.api_key,
            server_wait_timeout=args.server_wait_timeout,
            colocated=args.colocated,
            verifier_dtype=args.verifier_dtype,
            verifier_load_format=args.verifier_load_format,
            forward_tokens=args.verifier_forward_tokens,
            memory_cache_gib=args.hidden_states_memory_cache,
            memory_cache_device=args.hidden_states_memory_cache_device,
            max_failed_fraction=args.max_failed_fraction,
            failed_fraction_window=args.failed_fraction_window,
        ),
        optim=OptimConfig(
            name=args.optimizer,
            lr=args.lr,
            muon_lr=args.muon_lr,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            grad_accum=args.grad_accum,
            scheduler=args.scheduler,
            warmup_steps=args.warmup_steps,
        ),
        loss=LossConfig(
            args.loss, args.step_weight_beta, step_weights, args.loss_chunk_rows, args.kl_weight, args.loss_kernel
        ),
        logging=LoggingConfig(loggers, args.log_dir, args.run_name, args.log_every, not args.no_progress),
        from_pretrained=args.from_pretrained,
        num_speculative_steps=steps,
        mtp_input_norm=args.mtp_input_norm,
        epochs=args.epochs,
        max_steps=args.max_steps,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        val_every=args.val_every,
        validate_at_start=not args.no_initial_val,
        compile=args.compile,
        command=tuple(sys.argv),
    ).validate()


def run(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_now(_run_reporting_errors(args))
    return _run(args)


def _run_reporting_errors(args: argparse.Namespace) -> int:
    """`_run` with the errors reported as `mtptune` reports them (cli/main.py), for `_exit_now`."""
    try:
        return _run(args)
    except MtpTuneError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"mtptune train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtptune train: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        rank = os.environ.get("RANK", "?")
        if _peer_gone(exc):  # this rank is fine: another one died (its own output, and torchrun's summary, say why)
            print(
                f"mtptune train: rank {rank}: another rank stopped mid-step ({str(exc).splitlines()[0][:200]}). The "
                "checkpoints already written are complete: fix what stopped it and rerun the same command to resume.",
                file=sys.stderr,
            )
        else:
            traceback.print_exc()
        return 1


def _peer_gone(exc: BaseException) -> bool:
    """A collective failed because a peer process is gone (gloo says so; NCCL ranks are stopped by torchrun)."""
    text = str(exc)
    return "Connection closed by peer" in text or "Connection reset by peer" in text


def _exit_now(code: int) -> None:
    """End a torchrun rank without the interpreter's teardown. Its last step frees the DDP reducer, whose gloo
    process group then joins its worker thread while holding the GIL, and that thread may need the GIL to free a
    finished collective's tensors: the rank hung forever after a finished run (seen in tests/training/
    test_distributed.py: `~ProcessGroupGloo` joining `pt_gloo_runloop`, which waited in `decref_pyobject`). The
    run is complete here (checkpoints written, process group destroyed, logs flushed below)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    from mtptune.training.train import run_training

    config = build_config(args)
    result = run_training(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 130 if result.interrupted else 0
    before = result.val_before["tau_sim"] if result.val_before else None
    after = result.val_history[-1] if result.val_history else None
    print(f"trained {result.global_step} steps ({result.optimizer_steps} optimizer steps) -> {result.save_path}")
    if before is not None:
        print(f"validation tau_sim before: {before:.3f}")
    if after is not None:
        cond = " ".join(f"{after[f'cond_accept_step_{k}']:.3f}" for k in range(config.num_speculative_steps))
        print(f"validation tau_sim after:  {after['tau_sim']:.3f}  (conditional acceptance per step: {cond})")
    print(_data_summary(result.source_stats))
    if result.best_checkpoint is not None:
        print(f"best checkpoint: {result.best_checkpoint} -> {os.readlink(result.best_checkpoint)}")
    if result.interrupted:
        print(f"interrupted: saved {result.save_path / 'interrupted'}; rerun the same command to resume.")
        return 130
    return 0


def _data_summary(stats: dict) -> str:
    """One line that accounts for every sample: loaded, skipped (and why), truncated, server retries."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.get("invalid_reasons", {}).items()))
    line = (
        f"hidden states: {stats.get('loaded', 0)} loaded, {stats.get('invalid', 0)} invalid"
        f"{f' ({reasons})' if reasons else ''}, {stats.get('missing', 0)} missing, {stats.get('failed', 0)} failed; "
        f"{stats.get('truncated_rows', 0)} rows truncated to --total-seq-len"
    )
    if server := stats.get("server"):
        line += (
            f"; server: {server['generated']} generated, {server['cache_hits']} cache hits, {server['retried']} retries"
        )
    if colocated := stats.get("colocated"):
        line += f"; colocated verifier: {colocated['rows']} rows in {colocated['forwards']} forwards"
    if cache := stats.get("memory_cache"):
        line += f"; memory cache: {cache['hits']} hits, {cache['evicted']} evicted ({cache['bytes'] / 2**30:.2f} GiB)"
    return line
