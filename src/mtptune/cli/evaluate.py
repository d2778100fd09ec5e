"""`mtptune evaluate {offline,generate,vllm,compare}`: acceptance the way serving will see it (docs/contracts.md,
"Acceptance metrics")."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from mtptune.cli.arg_types import non_negative_float, positive_float, positive_int, seed
from mtptune.errors import ConfigError

log = logging.getLogger("mtptune.evaluate")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="measure acceptance: offline (teacher-forced tau_sim), generate (real speculative decoding), vllm, compare",
        description="Measure how many tokens per verifier step a head gives when served.",
    )
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True)

    offline = modes.add_parser("offline", help="teacher-forced tau_sim on a prepared dataset or a jsonl of token rows")
    _head_args(offline)
    offline.add_argument("--data", required=True, help="prepared dataset folder or .jsonl of {input_ids, loss_mask}")
    offline.add_argument("--max-rows", type=positive_int, default=None, help="evaluate at most this many rows")
    offline.add_argument("--server", nargs="+", default=None, metavar="URL", help="hidden-state server endpoint(s)")
    offline.add_argument(
        "--server-model", default=None, help="model id the server must serve (default: whatever it serves)"
    )
    _report_args(offline)
    offline.set_defaults(func=run_offline)

    generate = modes.add_parser("generate", help="real speculative decoding with the verifier and the head")
    _head_args(generate)
    _prompt_args(generate)
    generate.add_argument("--max-new-tokens", type=positive_int, default=64)
    generate.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="> 0: rejection sampling (no lossless check)"
    )
    generate.add_argument("--seed", type=seed, default=0)
    generate.add_argument(
        "--max-seconds",
        type=positive_float,
        default=None,
        help="start no new prompt after this many seconds per head (at least one runs); the result counts the "
        "prompts that ran",
    )
    generate.add_argument(
        "--tokenizer", default=None, help="tokenizer folder, .gguf or `qwen3.5` (default: the verifier's)"
    )
    generate.add_argument(
        "--turns",
        choices=("first", "all"),
        default="first",
        help="all: multi-turn prompts (MT-Bench's 2 turns, later user messages of `messages` rows) - each later turn "
        "is sent after the verifier's own answer to the earlier ones; every turn counts as one prompt",
    )
    generate.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="decode the prompts in N processes, each with its own verifier copy (a small verifier on a GPU is "
        "launch-bound: N processes share the device); results are merged, sampling is seeded per prompt",
    )
    generate.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="decode N prompts together, one verifier forward per round for all of them (full-attention verifiers: "
        "Llama, Qwen2, DeepSeek; others decode one prompt at a time); with --workers, per worker",
    )
    generate.add_argument(
        "--no-greedy-baseline",
        dest="greedy_baseline",
        action="store_false",
        help="temperature > 0 only: skip the plain greedy decoding of every prompt (no tokens/s comparison, half "
        "the time)",
    )
    generate.add_argument(
        "--tie-tolerance",
        type=non_negative_float,
        default=0.0,
        help="a greedy mismatch whose top-2 logit margin is <= this (or within the dtype's rounding) counts as a numerical tie, not an error",
    )
    _report_args(generate)
    generate.set_defaults(func=run_generate)

    vllm = modes.add_parser("vllm", help="acceptance from a running vLLM's /metrics counters")
    vllm.add_argument("--endpoint", default=None, help="vLLM URL, e.g. http://localhost:8000/v1")
    _prompt_args(vllm)
    vllm.add_argument("--max-tokens", type=positive_int, default=256)
    vllm.add_argument("--temperature", type=non_negative_float, default=0.0)
    vllm.add_argument("--concurrency", type=positive_int, default=8)
    vllm.add_argument("--chat", action="store_true", help="use /v1/chat/completions (default /v1/completions)")
    vllm.add_argument("--model", default=None, help="model id (default: GET /v1/models)")
    vllm.add_argument(
        "--num-steps", type=positive_int, default=None, help="K the server drafts (default: from the counters)"
    )
    vllm.add_argument(
        "--serve-command", metavar="STITCHED_DIR", default=None, help="print the `vllm serve` command and exit"
    )
    vllm.add_argument("--baseline", default=None, help="a result.json to show as 'before'")
    _report_args(vllm)
    vllm.set_defaults(func=run_vllm)

    compare = modes.add_parser("compare", help="two results side by side (result.json files or report folders)")
    compare.add_argument("before")
    compare.add_argument("after")
    compare.add_argument("--output", default=None, help="also write CSV + plot of both here")
    compare.set_defaults(func=run_compare)


def _head_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", required=True, help="head checkpoint, training checkpoint folder, or (stitched) verifier")
    p.add_argument("--verifier", default=None, help="verifier folder (default: the one the head names)")
    p.add_argument("--baseline-head", default=None, help="a second head evaluated the same way, shown as 'before'")
    p.add_argument(
        "--num-steps", type=positive_int, default=None, help="K drafts (default: the head's K, 3 for a native head)"
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bfloat16", help="verifier and head dtype (serving: bf16)"
    )
    p.add_argument("--device", default="cpu")


def _prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompts",
        default="gsm8k",
        help="gsm8k | gsm8k_heldout (the fixed 200-question held-out split) | gsm8k_train | mt_bench | a .jsonl / "
        ".txt file (text or token ids)",
    )
    p.add_argument("--num-prompts", type=positive_int, default=None, help="use the first N prompts (conversations)")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=None, help="folder for result.json, acceptance.csv, acceptance.png")
    p.add_argument("--training-metrics", default=None, help="metrics jsonl (or run folder) to plot training curves")
    p.add_argument("--no-plot", action="store_true")


def resolve_head_source(source: str) -> str:
    """A training run root resolves to its `checkpoint_best` (docs/contracts.md, "Output folders")."""
    path = Path(source)
    best = path / "checkpoint_best"
    if not (path / "config.json").is_file() and best.is_dir():
        return str(best)
    return source


def _load(args: argparse.Namespace, source: str):
    from mtptune.checkpoint.head_checkpoint import is_head_checkpoint
    from mtptune.modeling.load import load_head

    source = resolve_head_source(source)
    head, config, verifier = load_head(source, args.verifier, device=args.device, dtype=DTYPES[args.dtype])
    head.eval().requires_grad_(False)
    k = args.num_steps or (config.num_speculative_steps if is_head_checkpoint(Path(source)) else 3)
    return source, head, verifier, k


def _finish(args: argparse.Namespace, result, baseline=None) -> int:
    from mtptune.evaluation.report import format_table, labelled_results, write_report

    print(format_table(labelled_results(result, baseline)))
    if args.output:
        files = write_report(args.output, result, baseline, args.training_metrics, make_plot=not args.no_plot)
        print(f"\nwrote {files.result}, {files.csv}" + (f", {files.plot}" if files.plot else ""))
    return 0


def _check_device(args: argparse.Namespace) -> None:
    from mtptune.devices import resolve_device

    args.device = str(resolve_device(args.device))


def run_offline(args: argparse.Namespace) -> int:
    _check_device(args)
    from mtptune.data.rows import load_rows
    from mtptune.evaluation.offline import evaluate_offline
    from mtptune.evaluation.result import EvaluationResult

    rows = load_rows(args.data, args.max_rows)
    results = []
    states = None  # one source for both heads: the verifier is loaded (or the server asked) once
    try:
        for source in [s for s in (args.baseline_head, args.head) if s]:
            source, head, verifier, k = _load(args, source)
            states = states or _offline_source(args, verifier, head.hidden_size)
            log.info("offline: %s, K=%d, %d rows of %s", source, k, len(rows), args.data)
            tally = evaluate_offline(head, rows, states, k)
            results.append(
                EvaluationResult(
                    "offline",
                    source,
                    str(verifier.root),
                    str(args.data),
                    tally.counts,
                    tally.rows,
                    tally.label_accuracy,
                )
            )
    finally:
        if states is not None:
            states.close()
    return _finish(args, results[-1], results[0] if len(results) == 2 else None)


def _offline_source(args: argparse.Namespace, verifier, hidden_size: int):
    """The verifier's hidden states for offline evaluation: a server's (`--server`) or a forward in this process.
    Both go through the trainer's source layer; the layer-N residual becomes h_t in `evaluate_offline`."""
    from mtptune.serving.contract import capture_spec

    dtype = DTYPES[args.dtype]
    if args.server:
        from mtptune.serving.client import HiddenStatesClient
        from mtptune.serving.sources import ServerSource

        client = HiddenStatesClient(args.server, args.server_model, num_layers=1, hidden_size=hidden_size)
        spec = capture_spec(verifier.text_config.num_hidden_layers)
        return ServerSource(client, spec, prefetch=64, dtype=dtype)
    from mtptune.serving.colocated import ColocatedSource
    from mtptune.serving.verifier_runtime import VerifierRuntime

    runtime = VerifierRuntime.load(
        str(verifier.root),
        layer_ids=[verifier.text_config.num_hidden_layers],
        device=args.device,
        dtype=str(dtype).removeprefix("torch."),
        with_tokenizer=False,
    )
    return ColocatedSource(runtime)


def run_generate(args: argparse.Namespace) -> int:
    _check_device(args)
    from mtptune.evaluation.generation_job import GenerationJob, decode_prompts, run_workers
    from mtptune.evaluation.prompts import load_prompts
    from mtptune.evaluation.result import EvaluationResult
    from mtptune.evaluation.verifier_forward import VerifierForward
    from mtptune.metrics.acceptance import AcceptanceCounts

    if not args.greedy_baseline and args.temperature <= 0:
        raise ConfigError("--no-greedy-baseline needs --temperature > 0: at 0 the greedy run is the lossless check.")
    prompts = load_prompts(args.prompts, args.num_prompts, args.turns)
    results = []
    forward = None
    for source in [s for s in (args.baseline_head, args.head) if s]:
        source, head, verifier, k = _load(args, source)
        job = GenerationJob(
            head=source,
            verifier=args.verifier,
            num_steps=k,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            tie_tolerance=args.tie_tolerance,
            dtype=args.dtype,
            device=args.device,
            tokenizer=args.tokenizer,
            greedy_baseline=args.greedy_baseline,
            max_seconds=args.max_seconds,
            batch_size=args.batch_size,
        )
        turns = sum(p.num_turns for p in prompts)
        log.info("generate: %s, K=%d, %d prompts (%d turns), temperature %g", source, k, len(prompts), turns, args.temperature)  # fmt: skip
        if args.workers > 1:
            del head  # each worker loads its own
            run = run_workers(job, prompts, args.workers)
        else:
            forward = forward or VerifierForward.load(verifier, DTYPES[args.dtype], args.device)
            run = decode_prompts(job, list(enumerate(prompts)), forward=forward, head=head)
        stats = run.stats(args.temperature, args.greedy_baseline, args.seed, args.max_new_tokens)
        counts = AcceptanceCounts.from_accept_lengths(k, run.accept_lengths)
        by_turn = [AcceptanceCounts.from_accept_lengths(k, a) for a in run.turn_accept_lengths]
        results.append(
            EvaluationResult(
                "generate",
                source,
                str(verifier.root),
                args.prompts,
                counts,
                run.prompts,
                generation=stats,
                by_turn=by_turn if len(by_turn) > 1 else None,
            )
        )
        if run.numerical_ties:
            log.warning("%d prompt(s) diverged from greedy decoding at a numerical near-tie", run.numerical_ties)
    return _finish(args, results[-1], results[0] if len(results) == 2 else None)


def run_vllm(args: argparse.Namespace) -> int:
    from mtptune.evaluation.prompts import load_prompts
    from mtptune.evaluation.result import EvaluationResult
    from mtptune.evaluation.vllm_metrics import VllmEndpoint, run_vllm, vllm_serve_command

    if args.serve_command:
        print(vllm_serve_command(args.serve_command, args.num_steps or 3))
        return 0
    if not args.endpoint:
        raise ConfigError("evaluate vllm needs --endpoint URL (or --serve-command DIR to print the serve command).")
    prompts = load_prompts(args.prompts, args.num_prompts)
    endpoint = VllmEndpoint(args.endpoint)
    run = run_vllm(endpoint, prompts, args.max_tokens, args.temperature, args.concurrency, args.chat, args.model)
    if run.counters.drafts <= 0:
        raise ConfigError(f"{endpoint.root}: no drafts were counted during the run; is speculative decoding enabled?")
    counts = run.counters.acceptance_counts(args.num_steps)
    result = EvaluationResult(
        "vllm",
        run.model,
        endpoint.root,
        args.prompts,
        counts,
        run.requests,
        draft_tokens=round(run.counters.draft_tokens),
    )
    log.info("vLLM: %d requests, %d completion tokens in %.1f s", run.requests, run.completion_tokens, run.seconds)
    baseline = EvaluationResult.load(args.baseline) if args.baseline else None
    return _finish(args, result, baseline)


def run_compare(args: argparse.Namespace) -> int:
    from mtptune.evaluation.report import format_table, plot, write_csv
    from mtptune.evaluation.result import EvaluationResult

    before, after = EvaluationResult.load(args.before), EvaluationResult.load(args.after)
    labelled = [
        (Path(args.before).stem if Path(args.before).is_file() else Path(args.before).name, before),
        (Path(args.after).stem if Path(args.after).is_file() else Path(args.after).name, after),
    ]
    if labelled[0][0] == labelled[1][0]:
        labelled = [("A", before), ("B", after)]
    print(format_table(labelled))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "compare.csv", labelled)
        plot(out / "compare.png", labelled, None)
        print(f"\nwrote {out / 'compare.csv'}, {out / 'compare.png'}")
    return 0
