"""speculators-style entry point: `python scripts/prepare_data.py --model M --data gsm8k --output ./output ...`.

Same flags and behaviour as `mtptune prepare`."""

from __future__ import annotations

import argparse
import sys

from mtptune.cli.main import main
from mtptune.cli.prepare import add_prepare_arguments


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prepare_data", description=__doc__)
    add_prepare_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    argv = sys.argv[1:]
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parse(argv)  # fail with this script's usage on bad flags
    sys.exit(main([*(["--debug"] if debug else []), "prepare", *argv]))
