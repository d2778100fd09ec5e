"""The MTP objective against an independent full-logits reference, chunking, masking and step weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtptune.metrics.acceptance import AcceptanceCounts
from mtptune.modeling.load import load_head
from mtptune.training.loss import mtp_loss
from mtptune.training.loss_plan import LossPlan

K = 3


@pytest.fixture(scope="module")
def head(tiny_verifier):
    head, _, _ = load_head(tiny_verifier, tiny_verifier, dtype=torch.float32)
    return head


def hand_batch(vocab: int, hidden: int, seed: int = 0):
    """Two packed documents (lengths 9 and 7) with a prompt part and a hole in the loss mask."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [9, 7]
    ids = torch.randint(vocab, (1, sum(lengths)), generator=gen)
    mask = torch.ones(1, sum(lengths), dtype=torch.int64)
    mask[0, :2] = 0  # doc A prompt
    mask[0, 5] = 0  # a hole
    mask[0, 9:11] = 0  # doc B prompt
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    residual = torch.randn(1, sum(lengths), hidden, generator=gen)
    return ids, mask, pos, residual


def reference(head, ids, mask, pos, outputs, teacher, weights, kind="ce"):
    """Plain per-row loops: full logits, row t of step k predicts x_{t+k+2} within its document."""
    T = ids.shape[1]
    doc_start = [t for t in range(T) if pos[0, t] == 0]
    doc_of = [max(i for i, s in enumerate(doc_start) if s <= t) for t in range(T)]
    W = head.lm_head
    total = 0.0
    per_step = []
    for k, o in enumerate(outputs):
        logits = o[0] @ W.T
        teacher_logits = teacher[0] @ W.T
        terms = []
        for t in range(T):
            j = t + k + 2
            if j < T and doc_of[j] == doc_of[t] and mask[0, j] == 1:
                logq = F.log_softmax(logits[t], -1)
                if kind == "ce":
                    terms.append(-logq[ids[0, j]])
                else:
                    logp = F.log_softmax(teacher_logits[t + k + 1], -1)
                    if kind == "kl":
                        terms.append((logp.exp() * (logp - logq)).sum())
                    else:
                        terms.append(0.5 * (logp.exp() - logq.exp()).abs().sum())
        step = torch.stack(terms).mean().detach()
        per_step.append(step)
        total = total + weights[k] * step
    return total, per_step


def run_loss(head, ids, mask, pos, residual, weights, kind="ce", chunk_rows=2048, steps=K):
    teacher = head.verifier_final_norm(residual)
    outputs = head(ids, teacher, pos, steps, "post_norm", False)
    plan = LossPlan.build(ids, mask, pos, steps)
    counts = [float(c) for c in plan.counts]
    loss, metrics = mtp_loss(outputs, plan, teacher, head.lm_head, weights, counts, kind, chunk_rows)
    return loss, metrics, outputs, teacher


@pytest.mark.parametrize("kind", ["ce", "kl", "tv"])
def test_loss_equals_independent_reference(head, kind):
    ids, mask, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size)
    weights = [0.5102, 0.3061, 0.1837]
    loss, metrics, outputs, teacher = run_loss(head, ids, mask, pos, residual, weights, kind=kind)
    expected, per_step = reference(head, ids, mask, pos, outputs, teacher, weights, kind)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Doc A (9 tokens) supervises targets 2..8 minus the hole 5; doc B (7 tokens) targets 11..15.
    assert metrics.field("tokens").tolist() == [6 + 5, 5 + 4, 4 + 3]
    summary = metrics.summary(weights, kind)
    for k in range(K):
        assert summary[f"loss_step_{k}"] == pytest.approx(per_step[k].item(), rel=1e-5)


def test_chunked_equals_unchunked_loss_and_gradients(head):
    ids, mask, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size, seed=1)
    grads = []
    for chunk in (3, 10_000):
        head.zero_grad(set_to_none=True)
        loss, metrics, _, _ = run_loss(head, ids, mask, pos, residual, [0.5, 0.3, 0.2], kind="ce", chunk_rows=chunk)
        loss.backward()
        grads.append((loss.detach(), metrics.values.clone(), [p.grad.clone() for p in head.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1])
    for a, b in zip(grads[0][2], grads[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    head.zero_grad(set_to_none=True)


def test_zero_loss_mask_gives_zero_loss_without_graph(head):
    ids, mask, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size)
    loss, metrics, _, _ = run_loss(head, ids, torch.zeros_like(mask), pos, residual, [0.5, 0.3, 0.2])
    assert float(loss) == 0.0 and not loss.requires_grad
    assert metrics.field("tokens").sum() == 0 and metrics.drafts == 0


def test_step_weights_one_zero_zero_ignore_later_steps(head):
    ids, mask, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size, seed=2)
    results = []
    for weights, steps in (([1.0, 0.0, 0.0], 3), ([1.0], 1)):
        head.zero_grad(set_to_none=True)
        loss, _, _, _ = run_loss(head, ids, mask, pos, residual, weights, steps=steps)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in head.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
    head.zero_grad(set_to_none=True)


def test_tau_sim_is_acceptance_against_the_verifier_greedy_token(head):
    ids, mask, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size, seed=3)
    _, metrics, outputs, teacher = run_loss(head, ids, mask, pos, residual, [0.5, 0.3, 0.2])
    ref = (teacher[0] @ head.lm_head.T).argmax(-1)
    T = ids.shape[1]
    doc = torch.cumsum((pos[0] == 0).int(), 0)
    drafts = [
        t for t in range(T) if all(t + k + 2 < T and doc[t + k + 2] == doc[t] and mask[0, t + k + 2] for k in range(K))
    ]
    hits = torch.tensor(
        [[bool((outputs[k][0, t] @ head.lm_head.T).argmax() == ref[t + k + 1]) for t in drafts] for k in range(K)]
    )
    expected = AcceptanceCounts.from_hits(hits)
    assert metrics.acceptance().drafts == expected.drafts == len(drafts)
    assert metrics.acceptance().accepted_per_position == expected.accepted_per_position
    assert metrics.summary([0.5, 0.3, 0.2], "ce")["tau_sim"] == pytest.approx(expected.acceptance_length)


def test_document_local_attention_perturbing_one_document_leaves_the_other(head):
    """Doc B is packed *before* doc A: changing B's tokens and states must not move any of A's outputs."""
    ids, _, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size, seed=4)
    a_len, b_len = 9, 7
    ids = torch.cat([ids[:, a_len:], ids[:, :a_len]], 1)  # [B | A]
    residual = torch.cat([residual[:, a_len:], residual[:, :a_len]], 1)
    pos = torch.cat([torch.arange(b_len), torch.arange(a_len)])[None]
    out = head(ids, residual, pos, K)
    ids2, residual2 = ids.clone(), residual.clone()
    ids2[0, :b_len] = (ids2[0, :b_len] + 7) % head.lm_head.shape[0]
    residual2[0, :b_len] += torch.randn(b_len, head.hidden_size)
    out2 = head(ids2, residual2, pos, K)
    for k in range(K):
        torch.testing.assert_close(out[k][0, b_len:], out2[k][0, b_len:], rtol=0, atol=0)
        assert not torch.allclose(out[k][0, :b_len], out2[k][0, :b_len])


def test_loss_without_reference_is_the_same_loss_and_skips_verifier_metrics(head):
    ids, mask, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size, seed=5)
    teacher = head.verifier_final_norm(residual)
    outputs = head(ids, teacher, pos, K, "post_norm", False)
    plan = LossPlan.build(ids, mask, pos, K)
    counts = [float(c) for c in plan.counts]
    with_ref, m_ref = mtp_loss(outputs, plan, teacher, head.lm_head, [0.5, 0.3, 0.2], counts)
    without, m_no = mtp_loss(outputs, plan, teacher, head.lm_head, [0.5, 0.3, 0.2], counts, with_reference=False)
    torch.testing.assert_close(with_ref, without, rtol=0, atol=0)
    assert m_ref.field("ref_tokens").tolist() == m_ref.field("tokens").tolist() and m_ref.drafts > 0
    assert m_no.field("ref_tokens").sum() == 0 and m_no.drafts == 0 and m_no.field("accepted").sum() == 0
    assert m_no.summary([0.5, 0.3, 0.2], "ce")["loss"] == pytest.approx(m_ref.summary([0.5, 0.3, 0.2], "ce")["loss"])


def test_loss_plan_matches_the_per_row_rule_on_a_two_row_batch():
    """Flat indices over [B, T]: row t of step k is supervised iff x_{t+k+2} is in its document and masked in."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(50, (2, 12), generator=gen)
    mask = (torch.rand(2, 12, generator=gen) > 0.3).long()
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    plan = LossPlan.build(ids, mask, pos, K)
    doc = torch.cumsum((pos == 0).int(), 1)
    for k in range(K):
        expected = [
            b * 12 + t
            for b in range(2)
            for t in range(12)
            if t + k + 2 < 12 and doc[b, t + k + 2] == doc[b, t] and mask[b, t + k + 2]
        ]
        assert plan.rows[k].tolist() == expected
        assert plan.targets[k].tolist() == [int(ids.reshape(-1)[i + k + 2]) for i in expected]
    every = set(plan.rows[0].tolist()).intersection(*(set(r.tolist()) for r in plan.rows[1:]))
    assert plan.draft_rows.tolist() == sorted(every)
    assert plan.reference_rows.tolist() == sorted({i + k + 1 for k in range(K) for i in plan.rows[k].tolist()})
