"""Issue 21, goal 2: ONE head trained on a chat + math mix, evaluated on both domains.

SmolLM2-135M-Instruct (no MTP head: a fresh one is trained) on
* the verifier's own answers to ShareGPT prompts: the first --chat-samples conversations of the filtered,
  carried ShareGPT subset (examples/smollm2_gsm8k/chat_data.py: user turns only, never an MT-Bench turn or a
  held-out GSM8K question), each assistant turn regenerated greedily by the verifier given the conversation so far
  (`mtptune regenerate`, at most --chat-max-turns turns; an empty user turn is left out with its answer, a turn over
  the server's context ends the conversation, earlier turns kept), plus
* the verifier's answers to the 1,119 GSM8K training questions (greedy + 3 sampled each, as the GSM8K-only head);
evaluated with real speculative decoding (K = 3) on MT-Bench (80 questions x 2 turns, the second turn after the
verifier's own first answer) and on the fixed 200-question held-out GSM8K split, at T = 0 (lossless check) and
T = 0.7 (vLLM's rejection sampling), the fresh head beside it. MT-Bench and the held-out questions are never
trained on.

This is examples/smollm2_gsm8k/run.py with the mix's defaults below (every flag of that script works here and
overrides them; `--help` lists them). On a GPU device machine: examples/smollm2_chat_math/device_run.sh.

  python examples/smollm2_chat_math/run.py --tiny          # CPU, small subsets, end to end (minutes)
  python examples/smollm2_chat_math/run.py --work-dir W    # full size (GPU: add --device cuda; see device_run.sh)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GSM8K_RUN = Path(__file__).resolve().parents[1] / "smollm2_gsm8k" / "run.py"

# Full size: ~3.1 M training tokens (2,000 conversations x <= 2 turns + 4,476 GSM8K answers); 4 epochs to fit a
# 10-minute call on one H200 (estimate: not measured yet).
DEFAULTS = [
    "--work-dir", "runs/smollm2_chat_math",
    "--chat-samples", "2000", "--chat-max-turns", "2",
    "--train-samples", "0", "--answers-per-question", "4",
    "--test-samples", "200", "--generate-samples", "200", "--mtbench-samples", "80", "--mtbench-turns", "2",
    "--eval-temperatures", "0", "0.7",
    "--max-tokens", "256", "--eval-max-tokens", "128",
    "--loss", "kl", "--init", "random", "--epochs", "4", "--lr", "1.5e-3", "--total-seq-len", "8192",
    "--train-args", "--warmup-steps 30",
]  # fmt: skip
# CPU smoke run of every stage on small subsets (a few minutes on an idle 2-core box).
TINY = [
    "--work-dir", "runs/smollm2_chat_math_tiny",
    "--chat-samples", "4", "--train-samples", "6", "--answers-per-question", "1",
    "--test-samples", "4", "--generate-samples", "2", "--mtbench-samples", "2",
    "--max-tokens", "24", "--eval-max-tokens", "12", "--epochs", "1", "--lr", "1e-3", "--total-seq-len", "1024",
    "--server-max-rows", "16", "--concurrency", "32", "--eval-workers", "2", "--train-args", "",
]  # fmt: skip


def compose(argv: list[str]) -> list[str]:
    """The argv for smollm2_gsm8k/run.py: the mix's defaults (+ --tiny's), then the caller's flags (later wins)."""
    argv = list(argv)
    tiny = "--tiny" in argv
    argv = [a for a in argv if a != "--tiny"]
    return [*DEFAULTS, *(TINY if tiny else []), *argv]


def load_gsm8k_run():
    spec = importlib.util.spec_from_file_location("smollm2_gsm8k_run", GSM8K_RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    return load_gsm8k_run().main(compose(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
