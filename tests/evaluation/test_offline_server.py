"""Offline evaluation through a real hidden-state server (`mtptune serve --engine builtin`) equals the direct forward:
the server returns the pre-norm residual r_t and the head's copy of the verifier's final norm makes h_t of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtptune.evaluation.offline import evaluate_offline
from mtptune.modeling.load import load_head
from mtptune.serving.client import HiddenStatesClient
from mtptune.serving.contract import capture_spec
from mtptune.serving.sources import ServerSource
from mtptune.testing.server_process import running_server

from .trained_tiny import NUM_STEPS, TinySetup, direct_source


def server_source(endpoints: list[str], hidden_size: int) -> ServerSource:
    client = HiddenStatesClient(endpoints, None, num_layers=1, hidden_size=hidden_size)
    return ServerSource(client, capture_spec(4), prefetch=8, dtype=torch.float32)


def test_server_hidden_states_give_the_same_tau_sim(tiny: TinySetup, tmp_path: Path) -> None:
    head, _, _ = load_head(tiny.trained_head, str(tiny.verifier_dir))
    rows = tiny.eval_rows[:4]
    direct = evaluate_offline(head, rows, direct_source(tiny), NUM_STEPS)
    with running_server(tiny.verifier_dir, tmp_path / "hs") as base:
        served = evaluate_offline(head, rows, server_source([base], head.hidden_size), NUM_STEPS)
    assert served.counts.drafts == direct.counts.drafts
    # Same states up to bf16 rounding of the residual before the final norm: allow a rare flipped near-tie.
    assert served.counts.acceptance_length == pytest.approx(direct.counts.acceptance_length, abs=0.05)
