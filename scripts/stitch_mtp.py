#!/usr/bin/env python
"""speculators' spelling: `python scripts/stitch_mtp.py CKPT VERIFIER --output-path DIR` (= `mtptune stitch`)."""

import sys

from mtptune.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["stitch", *sys.argv[1:]]))
