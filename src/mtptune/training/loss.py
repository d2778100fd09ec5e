"""The MTP objective, computed chunk by chunk so full-vocabulary logits never exist for all rows at once.

For step k, row t predicts x_{t+k+2} (docs/contracts.md, "Targets") and is supervised iff that token is in the same document and
has loss_mask 1; only those rows reach the LM head, `chunk_rows` at a time, through `fused_linear_loss`, which
computes each chunk's input gradient in the forward pass: peak memory is one chunk of logits whatever the
sequence length and K (248k vocab x 8192 tokens x 3 steps would need ~24 GB in fp32), and the vocabulary matmul
is never recomputed in the backward.

Losses per step k (each averaged over its own supervised tokens N_k, then weighted by FastMTP alpha_k; docs/contracts.md, "Step weights"):
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

from mtptune.training.fused_linear_loss import fused_linear_loss
from mtptune.training.loss_kernels import library_ce, uses_library
from mtptune.training.loss_plan import LossPlan
from mtptune.training.step_metrics import StepMetrics


@torch.no_grad()
def reference_tokens(hidden_post_norm: torch.Tensor, lm_head: torch.Tensor, chunk_rows: int, index: torch.Tensor):
    """[B*T] the verifier's greedy next token argmax W_lm h_p at the flat positions `index` (-1 elsewhere),
    in chunks: the reference is one full-vocabulary matmul per row, so only the positions compared are done."""
    B, T, H = hidden_post_norm.shape
    flat = hidden_post_norm.reshape(B * T, H)
    out = torch.full((B * T,), -1, dtype=torch.int64, device=flat.device)
    for start in range(0, index.numel(), chunk_rows):
        chunk = index[start : start + chunk_rows]
        out[chunk] = F.linear(flat[chunk].to(lm_head.dtype), lm_head).argmax(-1)
    return out


def mtp_loss(
    outputs: list[torch.Tensor],
    plan: LossPlan,
    teacher_hidden: torch.Tensor,
    lm_head: torch.Tensor,
    step_weights: list[float],
    normalizers: list[float],
    kind: str = "ce",
    chunk_rows: int = 2048,
    kl_weight: float = 1.0,
    with_reference: bool = True,
    kernel: str = "ours",
) -> tuple[torch.Tensor, StepMetrics]:
    """sum_k alpha_k * (sum of step-k objective over its supervised rows) / normalizers[k].

    outputs: the head's per-step post-norm outputs o^k [B, T, H]; plan: the supervised rows (`LossPlan`, on the
    outputs' device); teacher_hidden: the verifier's post-norm states h [B, T, H] (reference tokens and
    distillation teacher). `with_reference=False` skips the verifier's greedy reference (one more
    full-vocabulary matmul per row) and with it the verifier-based metrics (acc_verifier, tau_sim) of this
    micro-batch. `kernel` (`training/loss_kernels.py`) picks the LM head + CE of the training steps for `ce`; a
    library kernel that gives no argmax leaves the argmax metrics (acc, acc_verifier, tau_sim) of steps without the
    reference unset (only logged steps read them, and those compute the reference and use ours). Returns the loss
    (a graph when outputs require grad; exactly zero without a graph when nothing is supervised) and this
    micro-batch's metric sums. Nothing here waits on the device.
    """
    if kernel != "ours" and kind != "ce":
        raise ValueError(f"loss kernel {kernel!r} computes cross-entropy only, not {kind!r}")
    K = len(outputs)
    B, T, H = teacher_hidden.shape
    device = teacher_hidden.device
    metrics = StepMetrics.zeros(K, device=device)
    ref = reference_tokens(teacher_hidden, lm_head, chunk_rows, plan.reference_rows) if with_reference else None
    teacher_flat = teacher_hidden.reshape(B * T, H)
    loss: torch.Tensor | None = None
    predictions = []
    for k, o in enumerate(outputs):
        rows, targets = plan.rows[k], plan.targets[k]
        n = rows.numel()
        metrics.add("tokens", k, n)
        prediction = torch.full((B * T,), -1, dtype=torch.int64, device=device)
        predictions.append(prediction)
        if n == 0:
            continue
        teacher = teacher_flat[rows + k + 1] if kind != "ce" else None
        train = o.requires_grad and step_weights[k] > 0 and normalizers[k] > 0
        scale = step_weights[k] / normalizers[k] if normalizers[k] > 0 else 0.0
        step_out = (o if train else o.detach()).reshape(B * T, H)[rows]
        if train and kernel != "ours" and uses_library(kernel, needs_argmax=with_reference):
            ce, argmax = library_ce(kernel, step_out, lm_head, targets)
            term = ce * scale
            metrics.add("ce", k, ce.detach())
        else:
            term, sums = fused_linear_loss(step_out, lm_head, targets, teacher, scale, kind, kl_weight, chunk_rows)
            argmax = sums.argmax
            metrics.add("ce", k, sums.ce)
            metrics.add("kl", k, sums.kl)
            metrics.add("tv", k, sums.tv)
        if train:
            loss = term if loss is None else loss + term
        if argmax is None:
            continue
        prediction[rows] = argmax
        metrics.add("correct_label", k, (argmax == targets).sum())
        if ref is not None:
            step_ref = ref[rows + k + 1]  # the verifier's greedy token for x_{t+k+2}
            metrics.add("ref_tokens", k, n)
            metrics.add("correct_verifier", k, (argmax == step_ref).sum())
            metrics.add("verifier_label_agree", k, (step_ref == targets).sum())
    if ref is not None:
        # Teacher-forced acceptance over rows where every step is supervised: accepted up to the first miss.
        drafts = plan.draft_rows
        hits = torch.stack([predictions[k][drafts] == ref[drafts + k + 1] for k in range(K)])
        metrics.drafts = drafts.numel()
        accepted = torch.cumprod(hits.to(torch.int64), dim=0).sum(dim=1)
        for k in range(K):
            metrics.add("accepted", k, accepted[k])
    if loss is None:
        loss = torch.zeros((), device=device)
    return loss, metrics
