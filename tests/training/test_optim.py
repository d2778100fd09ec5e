"""`--optimizer muon`: Muon on the head's weight matrices + AdamW on its norms, one optimizer, on a tiny head."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from mtptune.modeling.load import load_head
from mtptune.training.build import build_optimizer, build_scheduler
from mtptune.training.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
from mtptune.training.loss import mtp_loss
from mtptune.training.loss_plan import LossPlan
from mtptune.training.optim import MuonWithAdamW, is_muon_matrix

from .test_loss import hand_batch

K = 3
WEIGHTS = [0.5, 0.3, 0.2]


def fresh_head(tiny_verifier):
    head, _, _ = load_head(tiny_verifier, tiny_verifier, dtype=torch.float32)
    for p in head.parameters():
        p.requires_grad_(True)
    return head


def config(name: str, lr: float = 2e-3, muon_lr: float | None = None) -> TrainConfig:
    return TrainConfig(
        verifier="v", data=DataConfig("d"), checkpoint=CheckpointConfig("s"), optim=OptimConfig(name, lr, muon_lr)
    )


def batch(head, seed: int = 0):
    ids, mask, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size, seed=seed)
    teacher = head.verifier_final_norm(residual)
    plan = LossPlan.build(ids, mask, pos, K)
    return ids, pos, teacher, plan, [float(c) for c in plan.counts]


def loss_of(head, data):
    ids, pos, teacher, plan, counts = data
    outputs = head(ids, teacher, pos, K, "post_norm", False)
    loss, _ = mtp_loss(outputs, plan, teacher, head.lm_head, WEIGHTS, counts, with_reference=False)
    return loss


def train(head, optimizer, data, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = loss_of(head, data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_muon_groups_the_matrices_and_adamw_the_norms(tiny_verifier):
    head = fresh_head(tiny_verifier)
    opt = build_optimizer(config("muon"), head)
    assert isinstance(opt, MuonWithAdamW)
    muon, adamw = opt._muon, opt._adamw
    matrices = {id(p) for g in muon.param_groups for p in g["params"]}
    others = {id(p) for g in adamw.param_groups for p in g["params"]}
    params = list(head.parameters())
    assert matrices == {id(p) for p in params if p.ndim == 2} and matrices
    assert others == {id(p) for p in params if p.ndim != 2} and others
    assert all(g["adjust_lr_fn"] == "match_rms_adamw" and g["lr"] == 2e-3 for g in muon.param_groups)
    assert not is_muon_matrix(torch.zeros(1, 5)) and not is_muon_matrix(torch.zeros(5))
    assert build_optimizer(config("muon", muon_lr=0.02), head)._muon.param_groups[0]["lr"] == 0.02


def test_a_few_muon_steps_reduce_the_loss(tiny_verifier, one_thread):
    head = fresh_head(tiny_verifier)
    data = batch(head)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    opt = build_optimizer(config("muon", lr=2e-2), head)
    losses = train(head, opt, data, 6)
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < 0.9 * losses[0], losses
    for name, p in head.named_parameters():  # Muon moved the matrices, AdamW the norms
        assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name


def test_the_scheduler_reaches_both_and_a_resumed_optimizer_continues_identically(tiny_verifier, one_thread):
    head = fresh_head(tiny_verifier)
    data = batch(head, seed=1)
    opt = build_optimizer(config("muon", muon_lr=4e-3), head)
    sched = build_scheduler(config("muon"), opt, total_steps=10)
    train(head, opt, data, 2)
    sched.step()
    assert opt._muon.param_groups[0]["lr"] < 4e-3 and opt._adamw.param_groups[0]["lr"] < 2e-3
    saved_opt, saved_weights = copy.deepcopy(opt.state_dict()), {k: v.clone() for k, v in head.state_dict().items()}

    expected = train(head, opt, data, 2)
    after = [p.detach().clone() for p in head.parameters()]

    head.load_state_dict(saved_weights)
    resumed = build_optimizer(config("muon", muon_lr=4e-3), head)
    resumed.load_state_dict(saved_opt)
    assert resumed._muon.param_groups[0]["lr"] == opt._muon.param_groups[0]["lr"]
    assert resumed._muon.state is resumed.state and len(resumed.state) == len(list(head.parameters()))
    assert train(head, resumed, data, 2) == pytest.approx(expected, rel=1e-6)
    for a, b in zip(head.parameters(), after):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
