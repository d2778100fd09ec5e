"""LM head + loss fused per chunk of rows, with the gradient computed in the forward pass.

For the frozen LM head W [V, H], the loss over n rows only needs dL/dx = (dL/dz) W, where z = x W^T are the
logits. We compute it chunk by chunk right away and keep only that [n, H] gradient: logits of at most
`chunk_rows` rows ever exist, nothing is recomputed in the backward (activation checkpointing would run the
248k-vocab matmul twice), and the argmax the metrics need comes from the same logits.

Per-row objective and its logit gradient (q = softmax(z), p = the verifier's distribution):
* ce: -log q_y                         -> q - onehot(y)
* kl: sum_i p_i (log p_i - log q_i)    -> q - p
* tv: 1/2 sum_i |p_i - q_i|            -> q * (s - <q, s>) / 2, s = sign(q - p)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ChunkSums:
    """Per-call sums over rows (detached), for metrics."""

    objective: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    tv: torch.Tensor
    argmax: torch.Tensor  # [n]


def _objective_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logp: torch.Tensor | None, kind: str, kl_weight: float
):
    """logits fp32 [c, V] (overwritten) -> (objective sum, ce sum, kl sum, tv sum, grad wrt logits [c, V])."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    target_logit = logits.gather(-1, targets[:, None])
    ce = (lse - target_logit).sum()
    zero = logits.new_zeros(())
    kl = tv = zero
    q = logits.sub_(lse).exp_()  # in place: logits are not needed any more
    if teacher_logp is not None:
        p = teacher_logp.exp()
        logq = torch.log(q.clamp_min(1e-30))
        kl = (p * (teacher_logp - logq)).sum()
        del logq
        diff = q - p
        tv = 0.5 * diff.abs().sum()
    if kind == "ce":
        grad = q
        grad.scatter_add_(-1, targets[:, None], -torch.ones_like(target_logit))
        objective = ce
    elif kind == "kl":
        grad = diff
        objective = kl
    elif kind == "tv":
        s = diff.sign_()
        grad = q * (s - (q * s).sum(-1, keepdim=True)) * 0.5
        objective = tv
    else:  # ce+kl: d/dz [ce + w kl] = (q - onehot) + w (q - p)
        grad = diff.mul_(kl_weight).add_(q)
        grad.scatter_add_(-1, targets[:, None], -torch.ones_like(target_logit))
        objective = ce + kl_weight * kl
    return objective, ce, kl, tv, grad


def _ce_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float):
    """CE fast path on low-precision logits [c, V]: (grad wrt logits in the logits' dtype, ce sum, argmax).

    Written as reductions + one pointwise expression so that torch.compile fuses it into ~2 passes over the
    logits (read for max/lse/argmax, read + write for the gradient) instead of ~8 eager passes in fp32.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    onehot = torch.arange(x.shape[-1], device=x.device)[None, :] == targets[:, None]
    ce = (lse.squeeze(-1) - x.gather(-1, targets[:, None]).squeeze(-1)).sum()
    grad = ((x - lse).exp() - onehot.float()) * scale
    return grad.to(logits.dtype), ce, x.argmax(-1)


_compiled_ce_grad = None


def _ce_grad_fn(device: torch.device):
    """Compiled on CUDA (dynamic rows: the last chunk is shorter); eager elsewhere (CPU compile costs more)."""
    global _compiled_ce_grad
    if device.type != "cuda":
        return _ce_grad
    if _compiled_ce_grad is None:
        _compiled_ce_grad = torch.compile(_ce_grad, dynamic=True)
    return _compiled_ce_grad


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, scale, kind, kl_weight, chunk_rows, sums):
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        totals = torch.zeros(4, dtype=torch.float32, device=hidden.device)
        argmax = torch.empty(n, dtype=torch.int64, device=hidden.device)
        w = weight.to(hidden.dtype) if weight.dtype != hidden.dtype else weight
        for start in range(0, n, chunk_rows):
            sl = slice(start, start + chunk_rows)
            if kind == "ce" and w.dtype in (torch.bfloat16, torch.float16):
                grad, ce, argmax[sl] = _ce_grad_fn(hidden.device)(F.linear(hidden[sl], w), targets[sl], scale)
                totals[0] += ce.detach()
                totals[1] += ce.detach()
                if grad_hidden is not None:
                    grad_hidden[sl] = (grad @ w).to(hidden.dtype)
                del grad
                continue
            logits = F.linear(hidden[sl], w).float()
            argmax[sl] = logits.argmax(-1)
            teacher = None
            if teacher_hidden is not None:
                teacher = torch.log_softmax(F.linear(teacher_hidden[sl].to(w.dtype), w).float(), dim=-1)
            objective, ce, kl, tv, grad = _objective_and_grad(logits, targets[sl], teacher, kind, kl_weight)
            totals += torch.stack([objective, ce, kl, tv]).detach()
            if grad_hidden is not None:
                grad_hidden[sl] = (grad.mul_(scale).to(w.dtype) @ w).to(hidden.dtype)
            del logits, grad, teacher
        sums.append(ChunkSums(totals[0], totals[1], totals[2], totals[3], argmax))
        ctx.save_for_backward(grad_hidden) if grad_hidden is not None else None
        ctx.has_grad = grad_hidden is not None
        return totals[0] * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden = ctx.saved_tensors[0] if ctx.has_grad else None
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        return grad_hidden, None, None, None, None, None, None, None, None


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    scale: float = 1.0,
    kind: str = "ce",
    kl_weight: float = 1.0,
    chunk_rows: int = 2048,
) -> tuple[torch.Tensor, ChunkSums]:
    """scale * sum over rows of the objective for logits hidden @ weight^T; returns (loss, detached sums).

    hidden [n, H] (may require grad); weight [V, H] frozen; targets [n]; teacher_hidden [n, H] (kl / tv / ce+kl).
    """
    if kind != "ce" and teacher_hidden is None:
        raise ValueError(f"loss {kind!r} needs the verifier's hidden states (teacher_hidden)")
    sums: list[ChunkSums] = []
    loss = _FusedLinearLoss.apply(
        hidden, weight, targets, teacher_hidden, float(scale), kind, float(kl_weight), int(chunk_rows), sums
    )
    return loss, sums[0]
