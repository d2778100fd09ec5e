"""`mtptune demo`: the whole tutorial (convert -> serve -> data -> prepare -> train -> stitch -> evaluate) on a
built-in tiny verifier, on CPU, in a few minutes. Each step's command is printed as you would type it."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtptune.demo import DemoConfig


def register(sub: argparse._SubParsersAction) -> None:
    d = DemoConfig()
    parser = sub.add_parser(
        "demo",
        help="run the whole tutorial on a built-in tiny verifier (CPU, minutes) and print acceptance before/after",
        description="Build (or reuse) a tiny Qwen3.5 verifier with a native MTP head, then run convert, the "
        "built-in hidden-state server, target-regenerated data + prepare, online training, stitch and evaluation "
        "(offline tau_sim and real speculative decoding) on a held-out split; every command is printed. "
        "Re-running reuses the cached verifier and redoes the rest (--keep: also reuse finished steps; "
        "--overwrite: rebuild everything).",
    )
    parser.add_argument("--output", type=Path, default=d.output, help="output folder (default ./%(default)s)")
    parser.add_argument("--samples", type=int, default=None, help=f"training rows (default {d.samples}; --quick 64)")
    parser.add_argument(
        "--test-samples", type=int, default=None, help=f"held-out rows (default {d.test_samples}; --quick 8)"
    )
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {d.epochs}; --quick 6)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate (default %(default)s)")
    parser.add_argument("--port", type=int, default=d.port, help="server port (default: a free one)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--keep", action="store_true", help="reuse the steps a previous run finished (resume)")
    mode.add_argument("--overwrite", action="store_true", help="start from scratch, rebuilding the verifier too")
    parser.add_argument("--quick", action="store_true", help="smaller run for smoke tests (CI): about a minute")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from mtptune.demo import quick_config, run_demo

    config = DemoConfig(
        output=args.output, lr=args.lr, port=args.port, keep=args.keep, overwrite=args.overwrite, quick=args.quick
    )
    if args.quick:
        config = quick_config(config)
    given = {"samples": args.samples, "test_samples": args.test_samples, "epochs": args.epochs}
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    run_demo(config)
    return 0
