"""`mtptune prepare` (not implemented yet)."""

from __future__ import annotations

import argparse

from mtptune.errors import MtpTuneError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prepare", help="(not implemented yet)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise MtpTuneError("`mtptune prepare` is not implemented yet.")
