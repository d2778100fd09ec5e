"""A checkpoint's host snapshot of a head trained on the device: the exact values of the moment it was taken, private
(the next optimizer step does not reach it), in page-locked memory on CUDA (the fast copy the trainer relies on)."""

from __future__ import annotations

import pytest
import torch

from mtptune.training.checkpointing import TrainingState, snapshot

from .conftest import ON_CUDA, needs_device

pytestmark = [pytest.mark.gpu, needs_device]


def test_snapshot_holds_the_values_of_its_moment(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def step() -> None:
        model(torch.randn(16, 64, device=device)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    moments = {i: s["exp_avg_sq"].detach().cpu().clone() for i, s in optimizer.state_dict()["state"].items()}
    snap = snapshot(model, optimizer, scheduler, TrainingState(epoch=0, local_step=1, global_step=1), None)
    step()  # in place on the live tensors, queued right behind the snapshot's copies

    for name, value in weights.items():
        assert torch.equal(snap.head_state[name], value), name
        assert torch.equal(snap.extra["master_weights.pt"][name], value.float()), name
        assert snap.head_state[name].is_pinned() == ON_CUDA, name
        assert not torch.equal(model.state_dict()[name].cpu(), value), f"{name}: the second step changed nothing"
    saved = snap.extra["optimizer_state_dict.pt"]["state"]
    for index, value in moments.items():
        assert torch.equal(saved[index]["exp_avg_sq"], value), index
        assert saved[index]["exp_avg_sq"].device.type == "cpu"
