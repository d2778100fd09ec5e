"""The MTP objective, computed chunk by chunk so full-vocabulary logits never exist for all rows at once.

For step k, row t predicts x_{t+k+2} (contracts d6) and is supervised iff that token is in the same document and
has loss_mask 1; only those rows reach the LM head, `chunk_rows` at a time, through `fused_linear_loss`, which
computes each chunk's input gradient in the forward pass: peak memory is one chunk of logits whatever the
sequence length and K (248k vocab x 8192 tokens x 3 steps would need ~24 GB in fp32), and the vocabulary matmul
is never recomputed in the backward.

Losses per step k (each averaged over its own supervised tokens N_k, then weighted by FastMTP alpha_k, d7):
* `ce`: cross-entropy against the dataset token x_{t+k+2};
* `kl`: KL(p_verifier || q_head) toward the verifier's own next-token distribution at that position,
  p = softmax(W_lm h_{t+k+1}) from the same post-norm hidden states (no extra server call);
* `tv`: total variation 1/2 |p - q|_1 (1 - TV is the acceptance probability under rejection sampling);
* `ce+kl`: ce + kl_weight * kl.
N_k is the number of supervised tokens of the whole global batch (all micro-batches, all ranks), so the loss of a
global batch does not depend on how it is split into micro-batches or ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtptune.modeling.head import shift_left, step_targets
from mtptune.training.fused_linear_loss import fused_linear_loss
from mtptune.training.metrics import StepMetrics


def supervised_counts(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, position_ids: torch.Tensor, K: int
) -> list[int]:
    """N_k for one micro-batch: how many rows step k supervises."""
    return [int(step_targets(input_ids, loss_mask, position_ids, k)[1].sum()) for k in range(K)]


@torch.no_grad()
def reference_tokens(
    hidden_post_norm: torch.Tensor, lm_head: torch.Tensor, chunk_rows: int, needed: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T] the verifier's greedy next token argmax W_lm h_p, computed in chunks for the `needed` positions
    only (all when None; -1 elsewhere): the reference is one full-vocabulary matmul per row, so padding and
    unsupervised rows are skipped."""
    B, T, H = hidden_post_norm.shape
    flat = hidden_post_norm.reshape(B * T, H)
    out = torch.full((B * T,), -1, dtype=torch.int64, device=flat.device)
    index = needed.reshape(-1).nonzero().squeeze(-1) if needed is not None else None
    rows = flat if index is None else flat[index]
    argmax = torch.empty(rows.shape[0], dtype=torch.int64, device=flat.device)
    for start in range(0, rows.shape[0], chunk_rows):
        logits = F.linear(rows[start : start + chunk_rows].to(lm_head.dtype), lm_head)
        argmax[start : start + chunk_rows] = logits.argmax(-1)
    if index is None:
        out = argmax
    else:
        out[index] = argmax
    return out.reshape(B, T)


def shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """x[:, t - n] at column t; the first n columns are False/0."""
    return torch.cat([torch.zeros_like(x[:, :n]), x[:, : x.shape[1] - n]], dim=1)


def mtp_loss(
    outputs: list[torch.Tensor],
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head: torch.Tensor,
    step_weights: list[float],
    normalizers: list[float],
    kind: str = "ce",
    chunk_rows: int = 2048,
    kl_weight: float = 1.0,
) -> tuple[torch.Tensor, StepMetrics]:
    """sum_k alpha_k * (sum of step-k objective over its supervised rows) / normalizers[k].

    outputs: the head's per-step post-norm outputs o^k [B, T, H]; teacher_hidden: the verifier's post-norm states
    h [B, T, H] (reference tokens and distillation teacher). Returns the loss (a graph when outputs require grad;
    exactly zero without a graph when nothing is supervised) and this micro-batch's metric sums.
    """
    K = len(outputs)
    metrics = StepMetrics.zeros(K, device=input_ids.device)
    step_valid = [step_targets(input_ids, loss_mask, position_ids, k) for k in range(K)]
    # Step k row t compares with the verifier's token at position t+k+1: compute the reference only there.
    needed = torch.zeros_like(input_ids, dtype=torch.bool)
    for k, (_, valid) in enumerate(step_valid):
        needed |= shift_right(valid, k + 1)
    ref = reference_tokens(teacher_hidden, lm_head, chunk_rows, needed)
    need_teacher = kind != "ce"
    loss: torch.Tensor | None = None
    predictions = torch.full((K, *input_ids.shape), -1, dtype=torch.int64, device=input_ids.device)
    valid_all = torch.ones_like(input_ids, dtype=torch.bool)
    for k, o in enumerate(outputs):
        targets, valid = step_valid[k]
        valid_all &= valid
        rows = valid.nonzero(as_tuple=True)
        n = rows[0].numel()
        metrics.add("tokens", k, n)
        if n == 0:
            continue
        step_ref = shift_left(ref, k + 1)[rows]  # the verifier's greedy token for x_{t+k+2}
        step_targets_ = targets[rows]
        teacher = shift_left_hidden(teacher_hidden, k + 1)[rows] if need_teacher else None
        train = o.requires_grad and step_weights[k] > 0 and normalizers[k] > 0
        scale = step_weights[k] / normalizers[k] if normalizers[k] > 0 else 0.0
        step_out = o[rows] if train else o.detach()[rows]
        term, sums = fused_linear_loss(step_out, lm_head, step_targets_, teacher, scale, kind, kl_weight, chunk_rows)
        if train:
            loss = term if loss is None else loss + term
        metrics.add("ce", k, sums.ce)
        metrics.add("kl", k, sums.kl)
        metrics.add("tv", k, sums.tv)
        predictions[k][rows] = sums.argmax
        metrics.add("correct_label", k, (sums.argmax == step_targets_).sum())
        metrics.add("correct_verifier", k, (sums.argmax == step_ref).sum())
        metrics.add("verifier_label_agree", k, (step_ref == step_targets_).sum())
    # Teacher-forced acceptance over rows where every step is supervised: accepted up to the first miss.
    hits = torch.stack([predictions[k] == shift_left(ref, k + 1) for k in range(K)])[:, valid_all]
    metrics.drafts = hits.shape[1]
    accepted = torch.cumprod(hits.to(torch.int64), dim=0).sum(dim=1)
    for k in range(K):
        metrics.add("accepted", k, accepted[k])
    if loss is None:
        loss = torch.zeros((), device=input_ids.device)
    return loss, metrics


def shift_left_hidden(x: torch.Tensor, n: int) -> torch.Tensor:
    """x[:, t + n] at row t for [B, T, H]; rows past the end are zeros (never supervised)."""
    pad = torch.zeros_like(x[:, :n])
    return torch.cat([x[:, n:], pad], dim=1)[:, : x.shape[1]]
