"""`--loss-kernel`: which steps take a library kernel, the config errors, and the loss and gradients through the
library path equal ours (a pure-PyTorch stand-in plays the library here; tests/gpu/test_fused_loss.py runs the real
liger-kernel and cut-cross-entropy against an fp64 reference on CUDA)."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
import torch.nn.functional as F

from mtptune.errors import ConfigError
from mtptune.modeling.load import load_head
from mtptune.training import loss_kernels
from mtptune.training.config import CheckpointConfig, DataConfig, HiddenStatesConfig, LossConfig, TrainConfig
from mtptune.training.loss import mtp_loss
from mtptune.training.loss_kernels import (
    LibraryKernel,
    check_loss_kernel,
    library_ce,
    resolve_loss_kernel,
    uses_library,
)
from mtptune.training.loss_plan import LossPlan

from .test_loss import hand_batch

K = 3
WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def head(tiny_verifier):
    head, _, _ = load_head(tiny_verifier, tiny_verifier, dtype=torch.float32)
    return head


class StandIn:
    """A full-logits CE 'library' that records its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, hidden, weight, targets):
        self.calls += 1
        logits = hidden @ weight.T
        return F.cross_entropy(logits.float(), targets, reduction="sum"), logits.argmax(-1)


@pytest.fixture
def stand_in(monkeypatch):
    def register(gives_argmax: bool) -> StandIn:
        fn = StandIn()
        monkeypatch.setitem(loss_kernels.KERNELS, "standin", LibraryKernel(fn, gives_argmax, needs_cuda=False))
        return fn

    return register


def run(head, kernel: str, with_reference: bool, seed: int = 0):
    ids, mask, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size, seed=seed)
    head.zero_grad(set_to_none=True)
    teacher = head.verifier_final_norm(residual)
    outputs = head(ids, teacher, pos, K, "post_norm", False)
    plan = LossPlan.build(ids, mask, pos, K)
    counts = [float(c) for c in plan.counts]
    loss, metrics = mtp_loss(
        outputs, plan, teacher, head.lm_head, WEIGHTS, counts, with_reference=with_reference, kernel=kernel
    )
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() for p in head.parameters()]


@pytest.mark.parametrize("gives_argmax", [True, False])
def test_library_path_gives_ours_loss_gradients_and_metrics(head, stand_in, gives_argmax):
    fn = stand_in(gives_argmax)
    ours = run(head, "ours", with_reference=False)
    lib = run(head, "standin", with_reference=False)
    assert fn.calls == K
    torch.testing.assert_close(lib[0], ours[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(lib[2], ours[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lib[1].field("ce"), ours[1].field("ce"), rtol=1e-5, atol=1e-6)
    assert lib[1].summary(WEIGHTS, "ce")["loss"] == pytest.approx(ours[1].summary(WEIGHTS, "ce")["loss"], rel=1e-5)
    label = lib[1].field("correct_label")
    assert label.tolist() == (ours[1].field("correct_label").tolist() if gives_argmax else [0.0] * K)
    head.zero_grad(set_to_none=True)


def test_steps_that_need_the_argmax_use_ours_when_the_library_gives_none(head, stand_in):
    fn = stand_in(False)
    ours = run(head, "ours", with_reference=True, seed=1)
    lib = run(head, "standin", with_reference=True, seed=1)
    assert fn.calls == 0  # logged step: the metrics need every row's argmax
    torch.testing.assert_close(lib[0], ours[0], rtol=0, atol=0)
    torch.testing.assert_close(lib[1].values, ours[1].values)
    with_argmax = stand_in(True)
    run(head, "standin", with_reference=True, seed=1)
    assert with_argmax.calls == K
    assert uses_library("liger", needs_argmax=True) and not uses_library("ours", needs_argmax=False)
    head.zero_grad(set_to_none=True)


def test_validation_rows_without_grad_take_ours(head, stand_in):
    fn = stand_in(True)
    ids, mask, pos, residual = hand_batch(head.lm_head.shape[0], head.hidden_size, seed=2)
    with torch.no_grad():
        teacher = head.verifier_final_norm(residual)
        outputs = head(ids, teacher, pos, K, "post_norm", False)
        plan = LossPlan.build(ids, mask, pos, K)
        mtp_loss(outputs, plan, teacher, head.lm_head, WEIGHTS, [float(c) for c in plan.counts], kernel="standin")
    assert fn.calls == 0


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--loss-kernel must be one of auto, ours, liger"):
        check_loss_kernel("cce", "ce")
    check_loss_kernel("auto", "tv")  # auto never fails: it falls back to ours
    for kind in ("kl", "tv", "ce+kl"):
        with pytest.raises(ConfigError, match=re.escape(f"--loss {kind} needs the verifier's distribution")):
            check_loss_kernel("liger", kind)
    check_loss_kernel("ours", "tv")
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ConfigError, match="needs the liger-kernel package"):
            check_loss_kernel("liger", "ce")
    config = TrainConfig(
        verifier="v",
        data=DataConfig("d"),
        checkpoint=CheckpointConfig("s"),
        hidden_states=HiddenStatesConfig(on_missing="raise"),
        loss=LossConfig(kind="kl", kernel="liger"),
    )
    with pytest.raises(ConfigError, match="--loss-kernel liger computes cross-entropy only"):
        config.validate()
    with pytest.raises(ValueError, match="cross-entropy only"):
        mtp_loss([], None, torch.zeros(1, 1, 1), torch.zeros(1, 1), [], [], kind="kl", kernel="liger")


def test_auto_takes_liger_only_where_it_can_run(monkeypatch):
    have_liger = {"liger_kernel": True}
    monkeypatch.setattr(
        loss_kernels.importlib.util, "find_spec", lambda name: object() if have_liger.get(name) else None
    )
    assert resolve_loss_kernel("auto", "ce", "cuda") == "liger"
    assert resolve_loss_kernel("auto", "kl", "cuda") == "ours"  # liger computes CE only
    assert resolve_loss_kernel("auto", "ce", "cpu") == "ours"  # Triton kernels
    assert resolve_loss_kernel("ours", "ce", "cuda") == "ours"  # an explicit choice stays
    have_liger.clear()
    assert resolve_loss_kernel("auto", "ce", "cuda") == "ours"  # not installed


def test_library_kernels_need_cuda():
    hidden, weight, targets = torch.zeros(2, 4), torch.zeros(8, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        library_ce("liger", hidden, weight, targets)
    with pytest.raises(ConfigError, match="not a library kernel"):
        library_ce("ours", hidden, weight, targets)
