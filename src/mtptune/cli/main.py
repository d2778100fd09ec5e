"""`mtptune` entry point. Each subcommand lives in its own module exposing `register(subparsers)`, which adds
its parser and sets `func(args) -> int`. Errors of type MtpTuneError print without a traceback unless --debug."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mtptune import __version__
from mtptune.errors import MtpTuneError
from mtptune.modeling.compile_cache import use_persistent_compile_cache

SUBCOMMANDS = ("convert", "prepare", "regenerate", "serve", "train", "stitch", "evaluate", "export", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtptune",
        description="Finetune native multi-token-prediction (MTP) heads for speculative decoding in vLLM.\n"
        "Workflow: convert -> prepare -> serve -> train -> stitch -> evaluate  (`mtptune demo` runs it all).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mtptune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"mtptune.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    use_persistent_compile_cache()  # before any subcommand imports Triton kernels (the autotuner reads it then)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.debug:  # one INFO line per hidden-state request (thousands per epoch) buries the trainer's own log
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except MtpTuneError as exc:
        if args.debug:
            raise
        print(f"mtptune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtptune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
