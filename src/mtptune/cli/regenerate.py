"""`mtptune regenerate` (not implemented yet)."""

from __future__ import annotations

import argparse

from mtptune.errors import MtpTuneError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("regenerate", help="(not implemented yet)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise MtpTuneError("`mtptune regenerate` is not implemented yet.")
