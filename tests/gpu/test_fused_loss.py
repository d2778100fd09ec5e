"""GPU: the fused, chunked LM head + loss (`fused_linear_loss`; bf16 CE through the compiled kernel on CUDA) and its
gradient equal an unfused reference computed here: full logits in fp64 on the CPU, torch's cross-entropy / KL,
autograd for the gradient. The library kernels of `--loss-kernel` (liger-kernel, cut-cross-entropy) against the same
reference, on CUDA, where their packages are installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mtptune.training.fused_linear_loss import fused_linear_loss
from mtptune.training.loss_kernels import library_ce

from .conftest import cuda_only, needs_device, rel_err

pytestmark = [pytest.mark.gpu, needs_device]

N, H, V = 300, 64, 1000
CHUNK_ROWS = 64  # 4 full chunks and a 44-row tail (the compiled CE is dynamic in the rows)
SCALE = 0.37
KL_WEIGHT = 0.5
# (loss, gradient) relative tolerances: bf16 rounds the logits, the logit gradient and the input gradient.
TOLERANCES = {torch.bfloat16: (2e-3, 2e-2), torch.float32: (1e-5, 1e-4)}


def reference(hidden, weight, targets, teacher, kind: str):
    """Unfused: all N x V logits at once in fp64; returns (scale * objective, d/dhidden, sums, logits)."""
    x = hidden.detach().cpu().double().requires_grad_(True)
    w = weight.detach().cpu().double()
    logits = x @ w.T
    logq = torch.log_softmax(logits, dim=-1)
    ce = F.cross_entropy(logits, targets.cpu(), reduction="sum")
    kl = tv = torch.zeros((), dtype=torch.float64)
    if teacher is not None:
        logp = torch.log_softmax(teacher.detach().cpu().double() @ w.T, dim=-1)
        kl = F.kl_div(logq, logp, log_target=True, reduction="sum")  # sum p (log p - log q)
        tv = 0.5 * (logq.exp() - logp.exp()).abs().sum()
    objective = {"ce": ce, "kl": kl, "tv": tv, "ce+kl": ce + KL_WEIGHT * kl}[kind]
    loss = SCALE * objective
    loss.backward()
    return loss.detach(), x.grad, {"ce": ce.detach(), "kl": kl.detach(), "tv": tv.detach()}, logits.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["ce", "kl", "tv", "ce+kl"])
def test_fused_chunked_loss_and_gradient_equal_the_full_logits_reference(device, kind: str, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.3  # logits std ~2.4: a peaked softmax, far from uniform
    targets = torch.randint(0, V, (N,), generator=gen)
    teacher = torch.randn(N, H, generator=gen) if kind != "ce" else None

    x = hidden.to(device, dtype).requires_grad_(True)
    w = weight.to(device, dtype)
    t = teacher.to(device, dtype) if teacher is not None else None
    loss, sums = fused_linear_loss(x, w, targets.to(device), t, SCALE, kind, KL_WEIGHT, CHUNK_ROWS)
    loss.backward()
    assert loss.device.type == device.type and x.grad.dtype == dtype

    # The reference sees exactly the values the fused path got (inputs already rounded to dtype).
    ref_loss, ref_grad, ref_sums, logits = reference(x, w, targets, t, kind)
    loss_tol, grad_tol = TOLERANCES[dtype]
    if kind == "tv" and dtype == torch.bfloat16:
        grad_tol *= 3  # sign(q - p) flips wherever bf16-rounded logits put q within rounding of p
    loss_err, grad_err = rel_err(loss, ref_loss), rel_err(x.grad, ref_grad)
    print(
        f"{kind} {dtype}: loss {float(loss.detach()):.6f} ref {float(ref_loss):.6f} rel {loss_err:.2e}; grad rel {grad_err:.2e}"
    )
    assert loss_err < loss_tol and grad_err < grad_tol
    assert rel_err(sums.ce, ref_sums["ce"]) < loss_tol
    if kind != "ce":
        assert rel_err(sums.kl, ref_sums["kl"]) < 10 * loss_tol  # KL is a small difference of large terms
        assert rel_err(sums.tv, ref_sums["tv"]) < 10 * loss_tol
    # The argmax the metrics use: the reference's top logit, up to near-ties of the rounded logits.
    argmax = sums.argmax.cpu()
    top = logits.max(dim=-1).values
    chosen = logits.gather(-1, argmax[:, None]).squeeze(-1)
    tie = 0.0 if dtype == torch.float32 else 0.05
    assert bool((chosen >= top - tie - 1e-9).all()) and float((argmax == logits.argmax(-1)).double().mean()) > 0.97


def test_rows_without_grad_give_the_same_loss_and_no_gradient(device) -> None:
    """Validation: inputs that do not require grad take the same path, return the same loss and build no graph."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, H, generator=gen).to(device, torch.bfloat16)
    weight = (torch.randn(V, H, generator=gen) * 0.3).to(device, torch.bfloat16)
    targets = torch.randint(0, V, (N,), generator=gen).to(device)
    with_grad, _ = fused_linear_loss(hidden.clone().requires_grad_(True), weight, targets, None, SCALE, "ce", 1.0, 64)
    without, sums = fused_linear_loss(hidden, weight, targets, None, SCALE, "ce", 1.0, 64)
    assert not without.requires_grad
    assert torch.equal(with_grad.detach(), without)
    assert rel_err(sums.ce * SCALE, without) < 1e-6


LIBRARIES = {"liger": "liger_kernel"}


@cuda_only
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-input", "fp32-input-autocast"])
@pytest.mark.parametrize("vocab", [V, 32768])
@pytest.mark.parametrize("kernel", ["liger"])
def test_library_ce_and_input_gradient_equal_the_full_logits_reference(device, kernel: str, vocab: int, autocast):
    """`--loss-kernel liger` (training/loss_kernels.py): the library's CE sum and input gradient against the fp64
    reference, bf16 tolerance; the frozen LM head gets no gradient; two vocabulary sizes, two input dtypes."""
    if importlib.util.find_spec(LIBRARIES[kernel]) is None:
        pytest.skip(f"{kernel}: its package is not installed (benchmarks/device_wheels.sh carries it)")
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(vocab, H, generator=gen) * 0.3
    targets = torch.randint(0, vocab, (N,), generator=gen)
    w = weight.to(device, torch.bfloat16)
    if autocast:  # the trainer's case: fp32 head outputs under bf16 autocast
        x = hidden.to(device).requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ce, argmax = library_ce(kernel, x, w, targets.to(device))
    else:
        x = hidden.to(device, torch.bfloat16).requires_grad_(True)
        ce, argmax = library_ce(kernel, x, w, targets.to(device))
    (SCALE * ce).backward()
    assert ce.dtype == torch.float32 and x.grad.dtype == x.dtype and w.grad is None
    # The reference sees the bf16-rounded inputs the library multiplied.
    ref_loss, ref_grad, _, logits = reference(x.detach().to(torch.bfloat16), w, targets, None, "ce")
    loss_tol, grad_tol = TOLERANCES[torch.bfloat16]
    loss_err, grad_err = rel_err(SCALE * ce, ref_loss), rel_err(x.grad, ref_grad)
    print(f"{kernel} V={vocab} autocast={autocast}: loss rel {loss_err:.2e}; grad rel {grad_err:.2e}")
    assert loss_err < loss_tol and grad_err < grad_tol
    if argmax is not None:
        top = logits.max(dim=-1).values
        chosen = logits.gather(-1, argmax.cpu()[:, None]).squeeze(-1)
        assert bool((chosen >= top - 0.05).all())
