#!/usr/bin/env python
"""speculators-compatible launcher: `launch_vllm.py MODEL --target-layer-ids 32 -- --port 8000`.

Same code as `mtptune serve --engine vllm` (pass `--engine builtin|auto` to choose otherwise); `--dry-run` prints the
`vllm serve` command line.
"""

from __future__ import annotations

import sys

from mtptune.cli.main import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(
        a == "--engine" or a.startswith("--engine=") for a in argv[: argv.index("--") if "--" in argv else None]
    ):
        argv = ["--engine", "vllm", *argv]
    sys.exit(main(["serve", *argv]))
