"""`mtptune serve` (not implemented yet)."""

from __future__ import annotations

import argparse

from mtptune.errors import MtpTuneError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="(not implemented yet)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise MtpTuneError("`mtptune serve` is not implemented yet.")
