"""LM head + cross-entropy kernels A/B on one trainer step's shapes: prints ONE JSON line per variant.

One "step" = the K=3 MTP steps of one packed 8192-token micro-batch: for each step k, its supervised rows (mtptune's
packing and loss plan over the `--mix` rows, the mean of the first 4 micro-batches: 6,782 rows per step for the 8.1
rows, 5,186 for GSM8K-length rows)
through the frozen LM head [248,320 x 4096] (bf16) into a CE averaged over the rows, then backward (input gradient
only: the head is frozen). Each variant is timed the same way (CUDA events around forward + backward of all K steps,
median of --reps after --warmup, the hidden states rotating over 3 sets), its extra peak memory recorded, and its loss
and input gradient compared with an fp32 full-logits reference on --check-rows rows. `ours` runs first; every later
line carries `vs_ours` (its time over ours). A variant that fails to import or run prints an error line; the rest go on.

Logits: hidden states ~N(0, 1) with one constant feature whose LM-head column is a Zipf log-prior over a shuffled
vocabulary (frequent tokens are consistently likely, as in a trained head), plus N(0, --logit-std) noise; targets are
drawn from the prior. The defaults (Zipf exponent 1.5, noise 2.0) give a language-model-like softmax: entropy ~3.0
nats, top-1 probability ~0.38, ~130 of the 248k tokens above bf16 resolution (2.4e-4). The shape of the softmax
matters for cut-cross-entropy's gradient filter (`cce-filter`), which skips vocabulary blocks whose gradient is below
that resolution; timing and the other kernels do not depend on it.

    python benchmarks/loss_kernels.py [--mix long|gsm8k] [--variants ours,liger,cce,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from length_models import MIXES, supervised_rows_per_step  # this folder (the script's own) is on sys.path
from matmul_peak import matmul_rate

from mtptune.training.fused_linear_loss import fused_linear_loss
from mtptune.training.loss_kernels import library_ce

VARIANTS = ("ours", "liger", "cce", "ours-c4096", "liger-c1", "cce-filter", "ours-ligerce")
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden, weight, targets) -> mean CE


def _ours(chunk_rows: int) -> Loss:
    def fn(h, w, t):
        return fused_linear_loss(h, w, t, None, 1.0 / h.shape[0], "ce", 1.0, chunk_rows)[0]

    return fn


def _library(kernel: str) -> Loss:
    return lambda h, w, t: library_ce(kernel, h, w, t)[0] / h.shape[0]


def _liger_default_chunks(h, w, t):  # liger's own default: ~BT x H logits per chunk (~128 rows here)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(h, w, t, reduction="sum", chunk_mem_const=1) / h.shape[0]


def _cce_exact(h, w, t):  # exact gradient, no ignore mask (its public entry point's nonzero() syncs the device)
    from cut_cross_entropy.cce import CCEParams, linear_cross_entropy_apply

    params = CCEParams(t, None, None, "sum", None, False, t.shape)
    return linear_cross_entropy_apply(h.to(w.dtype), w, params).float() / h.shape[0]


def _cce_filtered(h, w, t):  # the library's public entry point and defaults (gradient filter "high", a nonzero())
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, t, reduction="sum", filter_eps="high") / h.shape[0]


class _OursWithLigerCE(torch.autograd.Function):
    """Our chunk loop (2048 rows, cuBLAS matmuls, gradient in the forward) with liger's Triton CE kernel (loss, argmax
    and the logit gradient written over the logits in one launch) in place of the compiled one."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        import triton
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

        n, V = hidden.shape[0], weight.shape[0]
        grad = torch.empty_like(hidden)
        loss = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        argmax = torch.empty(n, dtype=torch.int64, device=hidden.device)
        for start in range(0, n, chunk_rows):
            sl = slice(start, start + chunk_rows)
            logits = hidden[sl] @ weight.T
            rows = logits.shape[0]
            liger_cross_entropy_kernel[(rows,)](
                X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=targets[sl], Y_stride=1, weight_ptr=None,
                loss_ptr=loss[sl], z_loss_ptr=None, loss_stride=1, token_accuracy_ptr=None, token_accuracy_stride=0,
                predicted_tokens_ptr=argmax[sl], predicted_tokens_stride=1, n_cols=V, n_non_ignore=1,
                sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=-100, lse_square_scale=0.0,
                label_smoothing=0.0, reduction="sum", softcap=None, RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False,
                RETURN_PREDICTED_TOKENS=True, HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=True,
                BLOCK_SIZE=min(32768, triton.next_power_of_2(V)), num_warps=32,
            )  # fmt: skip
            torch.mm(logits, weight, out=grad[sl])  # logits now hold d loss / d logits
        ctx.save_for_backward(grad)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.saved_tensors[0] * grad_output.to(ctx.saved_tensors[0].dtype), None, None, None


def build(name: str) -> Loss:
    return {
        "ours": _ours(2048),
        "ours-c4096": _ours(4096),
        "liger": _library("liger"),  # as integrated: ~2048-row chunks, argmax returned
        "liger-c1": _liger_default_chunks,
        "cce": _cce_exact,  # measured, not offered by the trainer (docs/benchmarks.md, "LM-head loss kernels")
        "cce-filter": _cce_filtered,
        "ours-ligerce": lambda h, w, t: _OursWithLigerCE.apply(h, w, t, 2048) / h.shape[0],
    }[name]


def make_inputs(
    rows: list[int], hidden: int, vocab: int, logit_std: float, zipf: float, sets: int, seed: int, device: str
):
    gen = torch.Generator(device=device).manual_seed(seed)
    rank = torch.randperm(vocab, device=device, generator=gen).float() + 1.0
    prior = -zipf * torch.log(rank)
    w = torch.randn(vocab, hidden, device=device, generator=gen).mul_(logit_std / hidden**0.5)
    w[:, 0] = prior
    w = w.to(torch.bfloat16)
    probs = torch.softmax(prior, 0)
    batches = []
    for _ in range(sets):
        hs, ts = [], []
        for n in rows:
            h = torch.randn(n, hidden, device=device, generator=gen)
            h[:, 0] = 1.0
            hs.append(h.to(torch.bfloat16))
            ts.append(torch.multinomial(probs, n, replacement=True, generator=gen))
        batches.append((hs, ts))
    return w, batches


def reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 full logits on the bf16 inputs: (mean CE, d mean CE / d h)."""
    logits = h.float() @ w.float().T
    lse = torch.logsumexp(logits, -1)
    loss = (lse - logits.gather(-1, t[:, None]).squeeze(-1)).mean()
    p = torch.softmax(logits, -1)
    p[torch.arange(h.shape[0], device=h.device), t] -= 1.0
    return loss, (p @ w.float()) / h.shape[0]


def accuracy(fn: Loss, w: torch.Tensor, h: torch.Tensor, t: torch.Tensor, ref: tuple) -> dict:
    x = h.clone().requires_grad_(True)
    loss = fn(x, w, t)
    loss.backward()
    ref_loss, ref_grad = ref
    g = x.grad.float()
    rows = (g - ref_grad).norm(dim=-1) / ref_grad.norm(dim=-1).clamp_min(1e-30)
    return {
        "loss_rel_err": float((loss.detach().float() - ref_loss).abs() / ref_loss.abs()),
        "grad_rel_err": float((g - ref_grad).norm() / ref_grad.norm()),
        "grad_row_rel_err_max": float(rows.max()),
    }


def time_variant(fn: Loss, w: torch.Tensor, batches: list, warmup: int, reps: int) -> tuple[list[float], float]:
    inputs = [([h.clone().requires_grad_(True) for h in hs], ts) for hs, ts in batches]

    def step(i: int) -> None:
        hs, ts = inputs[i % len(inputs)]
        total = None
        for h, t in zip(hs, ts):
            h.grad = None
            loss = fn(h, w, t)
            total = loss if total is None else total + loss
        total.backward()

    for i in range(warmup):
        step(i)
    cuda = w.is_cuda
    if not cuda:  # a smoke run on the CPU (tests): wall-clock times, no memory figure
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return times, float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times, (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", choices=MIXES, default="long")
    parser.add_argument("--rows", default=None, help="rows per MTP step, e.g. 6800,6800,6800 (default: from --mix)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=248320)
    parser.add_argument("--logit-std", type=float, default=2.0)
    parser.add_argument("--zipf", type=float, default=1.5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--check-rows", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help="also append each JSON line here as it is printed")
    args = parser.parse_args()

    if args.rows:
        rows = [int(r) for r in args.rows.split(",")]
    else:
        counts = supervised_rows_per_step(args.mix, 400 if args.mix == "long" else 1500)  # device_issue19.sh's files
        rows = [round(statistics.mean(c[k] for c in counts)) for k in range(len(counts[0]))]  # a mean micro-batch
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a smoke run at small shapes
    rate = matmul_rate(device, n=8192 if device == "cuda" else 512)
    w, batches = make_inputs(rows, args.hidden, args.vocab, args.logit_std, args.zipf, 3, 0, device)
    h0, t0 = batches[0][0][0][: args.check_rows], batches[0][1][0][: args.check_rows]
    ref = reference(h0, w, t0)
    flops = 4 * args.vocab * args.hidden * sum(rows)  # forward + input-gradient matmuls
    common = {
        "benchmark": "loss_kernels",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "mix": args.mix,
        "rows_per_step": rows,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "matmul_tflops": round(rate / 1e12, 1),
        "floor_ms": round(flops / rate * 1e3, 2),
    }
    ours_ms = None
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        line = {**common, "variant": name}
        t0_wall = time.perf_counter()
        try:
            fn = build(name)
            line.update(accuracy(fn, w, h0, t0, ref))
            times, peak = time_variant(fn, w, batches, args.warmup, args.reps)
            ms = statistics.median(times)
            line.update(
                ms_median=round(ms, 2),
                ms_min=round(min(times), 2),
                ms_max=round(max(times), 2),
                tflops=round(flops / (ms / 1e3) / 1e12, 1),
                floor_fraction=round(common["floor_ms"] / ms, 3),
                peak_extra_gib=round(peak, 2) if peak == peak else None,
            )
            if name == "ours":
                ours_ms = ms
            elif ours_ms:
                line["vs_ours"] = round(ms / ours_ms, 3)
        except Exception as exc:  # a library missing or failing: say so and go on
            line["error"] = f"{type(exc).__name__}: {exc}"[:400]
            traceback.print_exc()
        line["wall_s"] = round(time.perf_counter() - t0_wall, 1)
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(text + "\n")
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
