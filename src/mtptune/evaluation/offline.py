"""Teacher-forced acceptance simulation tau_sim (docs/contracts.md, "Acceptance metrics"), as serving would see it
at temperature 0.

For every draft slot t (the head's first pass reads token x_{t+1} and hidden h_t), step k predicts position
t+k+2 and consumes its own step-(k-1) output. The reference is the verifier's own greedy token there,
argmax W_lm h_{t+k+1} (free from the same hidden states), not the dataset label: serving accepts what the
verifier would have produced. A draft counts when all K target positions exist in its document and are
supervised; it is accepted up to its first miss. Exact when the rows are the verifier's own greedy
continuations; an estimate otherwise. Label accuracy (against the dataset tokens) is reported for reference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mtptune.data.rows import Row
from mtptune.errors import CheckpointError, ServerError
from mtptune.evaluation.verifier_forward import greedy_tokens
from mtptune.metrics.acceptance import AcceptanceCounts
from mtptune.modeling.head import MtpHead
from mtptune.serving.sources import HiddenSource
from mtptune.training.numerics import describe_tensors, non_finite_tensors

log = logging.getLogger(__name__)


@dataclass
class OfflineTally:
    """Acceptance counts plus per-step label hits, accumulated over rows."""

    counts: AcceptanceCounts
    label_hits: list[int]
    rows: int = 0

    @classmethod
    def empty(cls, num_steps: int) -> OfflineTally:
        return cls(AcceptanceCounts(num_steps), [0] * num_steps)

    def add(self, other: OfflineTally) -> None:
        self.counts = self.counts.merge(other.counts)
        self.label_hits = [a + b for a, b in zip(self.label_hits, other.label_hits)]
        self.rows += other.rows

    @property
    def label_accuracy(self) -> list[float]:
        d = self.counts.drafts
        return [h / d if d else 0.0 for h in self.label_hits]


def draft_rows(loss_mask: torch.Tensor, num_steps: int) -> torch.Tensor:
    """[T] bool: slot t is a draft iff positions t+2 .. t+K+1 exist and are all supervised."""
    T = loss_mask.shape[0]
    valid = torch.zeros(T, dtype=torch.bool)
    n = T - num_steps - 1  # slots 0 .. T-K-2
    if n <= 0:
        return valid
    supervised = loss_mask.bool()
    ok = torch.ones(n, dtype=torch.bool)
    for k in range(num_steps):
        ok &= supervised[k + 2 : k + 2 + n]
    valid[:n] = ok
    return valid


@torch.no_grad()
def slot_hits(
    head: MtpHead, input_ids: torch.Tensor, hidden: torch.Tensor, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, T] bool pairs for one document: step k at slot t equals the verifier's greedy token at t+k+2 /
    equals the dataset token there. hidden [T, H] = the verifier's post-norm states h_t of input_ids [T]."""
    hidden = hidden.to(device=head.lm_head.device, dtype=head.fc.weight.dtype)
    ids = input_ids.to(hidden.device)
    reference = greedy_tokens(hidden, head.logits)  # reference[t] = the verifier's greedy token at t+1
    outputs = head(ids[None], hidden[None], num_steps=num_steps, hidden_is_pre_norm=False)
    T = ids.shape[0]
    hits, label_hits = [], []
    for k, o in enumerate(outputs):
        predicted = greedy_tokens(o[0], head.logits)  # slot t predicts position t+k+2
        shift = k + 1
        ref = torch.full_like(reference, -1)
        ref[: T - shift] = reference[shift:]
        label = torch.full_like(ids, -1)
        label[: T - shift - 1] = ids[shift + 1 :]
        hits.append(predicted == ref)
        label_hits.append(predicted == label)
    return torch.stack(hits).cpu(), torch.stack(label_hits).cpu()


def tally_row(
    head: MtpHead, input_ids: torch.Tensor, loss_mask: torch.Tensor, hidden: torch.Tensor, num_steps: int
) -> OfflineTally:
    """One document: input_ids [T], loss_mask [T], hidden [T, H] = the verifier's post-norm states h_t."""
    hits, label_hits = slot_hits(head, input_ids, hidden, num_steps)
    valid = draft_rows(loss_mask.cpu(), num_steps)
    counts = AcceptanceCounts.from_hits(hits, valid)
    return OfflineTally(counts, (label_hits & valid).sum(dim=1).tolist(), rows=1)


def evaluate_offline(
    head: MtpHead, rows: Iterable[Row], source: HiddenSource, num_steps: int, log_every: int = 50
) -> OfflineTally:
    """tau_sim, p_k, c_k (and label accuracy) of `head` over `rows` with hidden states from `source`. The head
    reads h_t = FinalNorm(r_t), as vLLM feeds its drafter. A row without hidden states is an error here: an
    evaluation must not quietly leave rows out; nor may a head with a NaN or Inf weight pass for one that drafts
    nothing (its acceptance would read 0.000)."""
    if bad := non_finite_tensors(head):
        raise CheckpointError(
            f"the head holds NaN or Inf in {describe_tensors(bad)}, so its acceptance would read 0.000 without meaning "
            "anything; the training run that wrote it probably diverged. Evaluate an earlier checkpoint."
        )
    tally = OfflineTally.empty(num_steps)
    for i, (row, residual) in enumerate(source.stream(rows), start=1):
        if isinstance(residual, Exception):
            raise ServerError(f"no hidden states for row {row.row_id}: {residual}") from residual
        residual = residual.to(device=head.lm_head.device)
        hidden, _ = head.residual_to_inputs(residual, "post_norm")
        tally.add(tally_row(head, row.input_ids, row.loss_mask, hidden, num_steps))
        if log_every and i % log_every == 0:
            log.info(
                "offline: %d rows, %d drafts, tau_sim %.3f", i, tally.counts.drafts, tally.counts.acceptance_length
            )
    return tally
