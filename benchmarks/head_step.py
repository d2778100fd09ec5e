"""Head-step micro-benchmark (GPU): one training step of a Qwen3.5-9B-shaped MTP head on a synthetic packed batch,
for each attention backend, several packed lengths (shape changes must not recompile forever). Prints ONE JSON line.

A step = head forward (K steps) + fused LM-head loss on supervised rows + backward + fused AdamW. No data
loading, no metrics: the compute the trainer's step cannot avoid.

    python benchmarks/head_step.py [--backends flex dense] [--lengths 8100 7600 8192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers import Qwen3_5TextConfig

from mtptune.families import family_by_name
from mtptune.modeling.head import MtpHead, SharedWeights, step_targets
from mtptune.training.fused_linear_loss import fused_linear_loss

QWEN35_9B = dict(
    vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
    num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
)  # fmt: skip


def packed_batch(T: int, vocab: int, hidden: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < T:
        n = min(int(torch.randint(300, 1501, (1,), generator=g)), T - total)
        lengths.append(n)
        total += n
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    mask = torch.cat([(torch.arange(n) >= min(130, n // 3)).long() for n in lengths])[None]
    ids = torch.randint(0, vocab, (1, T), generator=g)
    hidden_states = torch.randn(1, T, hidden, generator=g).to(torch.bfloat16)
    return ids.cuda(), mask.cuda(), pos.cuda(), hidden_states.cuda()


def step(head, opt, batch, backend: str, K: int, weights: list[float], chunk_rows: int) -> None:
    ids, mask, pos, hs = batch
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = head(ids, hs, pos, num_steps=K, attention_backend=backend)
        loss = None
        for k, o in enumerate(outs):
            targets, valid = step_targets(ids, mask, pos, k)
            rows = valid.nonzero(as_tuple=True)
            term, _ = fused_linear_loss(o[rows], head.lm_head, targets[rows], scale=weights[k] / rows[0].numel(),
                                        chunk_rows=chunk_rows)  # fmt: skip
            loss = term if loss is None else loss + term
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["flex"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[7554, 8011, 7320, 8192])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--chunk-rows", type=int, default=2048)
    parser.add_argument("--profile", default=None, help="write a torch.profiler kernel table of one step here")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    config = Qwen3_5TextConfig(**QWEN35_9B)
    family = family_by_name("qwen3_5")
    torch.manual_seed(0)
    with torch.device("cuda"):
        head = MtpHead(family, config).float()
        shared = SharedWeights(
            embed=torch.randn(config.vocab_size, 4096, dtype=torch.bfloat16) * 0.02,
            lm_head=torch.randn(config.vocab_size, 4096, dtype=torch.bfloat16) * 0.02,
            final_norm=torch.zeros(4096),
        )
    head.set_shared(shared)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-5, fused=True)
    weights = [0.5102, 0.3061, 0.1837]
    result: dict = {"benchmark": "head_step", "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for backend in args.backends:
        torch.cuda.reset_peak_memory_stats()
        times, firsts = {}, {}
        for i, T in enumerate(args.lengths):
            batch = packed_batch(T, config.vocab_size, 4096, seed=i)
            per = []
            for _ in range(args.repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(head, opt, batch, backend, 3, weights, args.chunk_rows)
                torch.cuda.synchronize()
                per.append(time.perf_counter() - t0)
            firsts[T] = round(per[0] * 1e3, 1)
            times[T] = round(statistics.median(per[1:]) * 1e3, 1)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step(head, opt, batch, backend, 3, weights, args.chunk_rows)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
            Path(args.profile).write_text(table)
            print(table[:6000])
        tokens = sum(args.lengths) / len(args.lengths)
        ms = statistics.mean(times.values())
        result[backend] = {
            "step_ms_by_len": times,
            "first_ms_by_len": firsts,
            "tokens_per_s": round(tokens / ms * 1e3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        print(backend, result[backend], flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
