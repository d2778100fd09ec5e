"""Thin wrapper so the tutorial's `python scripts/train.py ...` (and `torchrun ... scripts/train.py ...`) works."""

import sys

from mtptune.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
