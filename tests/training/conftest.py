"""Fixtures for the trainer: a learnable tiny verifier (trained once per session), prepared rows, offline files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtptune.testing.learnable import (
    LearnableSpec,
    pattern_rows,
    write_hidden_state_files,
    write_learnable_verifier,
    write_prepared_rows,
)
from mtptune.training.config import (
    CheckpointConfig,
    DataConfig,
    HiddenStatesConfig,
    LoggingConfig,
    OptimConfig,
    TrainConfig,
)

NUM_ROWS = 160


@dataclass(frozen=True)
class Learnable:
    verifier: Path
    data: Path  # prepared rows with offline hidden states in data/hidden_states
    rows: list[dict]


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs with one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def learnable(tmp_path_factory) -> Learnable:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("learnable")
        spec = LearnableSpec()
        verifier = write_learnable_verifier(root / "verifier", spec)
        rows = pattern_rows(spec, NUM_ROWS, seed=1)
        data = write_prepared_rows(rows, root / "data")
        write_hidden_state_files(verifier, rows, data / "hidden_states")
    finally:
        torch.set_num_threads(threads)
    return Learnable(verifier, data, rows)


def offline_config(learnable: Learnable, save_path: Path, **overrides) -> TrainConfig:
    """A small offline run over the pre-written hidden-state files."""
    fields = dict(
        verifier=str(learnable.verifier),
        data=DataConfig(str(learnable.data), total_seq_len=256, train_data_ratio=0.8),
        checkpoint=CheckpointConfig(str(save_path)),
        hidden_states=HiddenStatesConfig(on_missing="raise", prefetch=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        logging=LoggingConfig(log_every=1, progress_bar=False),  # tests compare per-step losses
        epochs=2,
    )
    fields.update(overrides)
    return TrainConfig(**fields)
