"""GPU: colocated hidden states (the verifier's forward in the trainer's process) on the device.

The device's bf16 residuals of a hybrid Qwen3.5 (Gated DeltaNet + full attention) equal the CPU fp32 forward's;
a colocated training run on the device keeps the states there (no host round trip), packs them into the padded
micro-batches and trains on exactly what a run reading the same states from files trains on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtptune.data.rows import PreparedRows
from mtptune.serving.colocated import ColocatedSource, ForwardShapes
from mtptune.serving.contract import CaptureSpec
from mtptune.serving.verifier_runtime import VerifierRuntime
from mtptune.testing.learnable import write_prepared_rows
from mtptune.training.config import (
    CheckpointConfig,
    DataConfig,
    HiddenStatesConfig,
    LoggingConfig,
    OptimConfig,
    TrainConfig,
)
from mtptune.training.train import run_training

from .conftest import needs_device, rel_err
from .test_trainer_numerics import random_rows

pytestmark = [pytest.mark.gpu, needs_device]

N_LAYERS = 4  # the tiny Qwen3.5's num_hidden_layers
SHAPES = ForwardShapes(tokens=512, width_step=64)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared_rows(random_rows(40, seed=7), tmp_path_factory.mktemp("colocated") / "data")


def residuals(verifier: Path, rows, device: str, dtype: str) -> dict[int, torch.Tensor]:
    runtime = VerifierRuntime.load(str(verifier), [N_LAYERS], device=device, dtype=dtype, with_tokenizer=False)
    return {row.row_id: r for row, r in ColocatedSource(runtime, SHAPES).stream(rows)}


def test_device_residuals_equal_the_cpu_forward(qwen35_verifier: Path, data_path: Path, device: torch.device) -> None:
    rows = list(PreparedRows(data_path))
    on_device = residuals(qwen35_verifier, rows, str(device), "bfloat16")
    reference = residuals(qwen35_verifier, rows, "cpu", "float32")
    for row in rows:
        r = on_device[row.row_id]
        assert r.device.type == device.type and r.dtype == torch.bfloat16 and r.shape[0] == len(row)
        assert rel_err(r, reference[row.row_id]) < 2e-2  # bf16 weights and activations vs fp32


def config(verifier: Path, data: Path, save: Path, device: torch.device, hs: HiddenStatesConfig) -> TrainConfig:
    return TrainConfig(
        verifier=str(verifier),
        data=DataConfig(str(data), total_seq_len=256, train_data_ratio=0.75),
        checkpoint=CheckpointConfig(str(save)),
        hidden_states=hs,
        optim=OptimConfig(lr=1e-3, scheduler="constant"),
        logging=LoggingConfig(log_every=1, progress_bar=False),
        epochs=2,
        device=str(device),
        validate_at_start=False,
    )


def test_colocated_run_trains_on_what_a_files_run_trains_on(
    qwen35_verifier: Path, data_path: Path, device: torch.device, tmp_path: Path
) -> None:
    """The colocated states, written to files and read back by an offline run, give the same losses: the only
    difference between the runs is where the states came from (device memory vs files)."""
    rows = list(PreparedRows(data_path))
    states = residuals(qwen35_verifier, rows, str(device), "bfloat16")
    files = data_path / "hidden_states"
    files.mkdir(exist_ok=True)
    spec = CaptureSpec((N_LAYERS,), N_LAYERS)
    for row in rows:
        tensors = {"hidden_states": states[row.row_id][:, None].cpu().contiguous(), "token_ids": row.input_ids}
        save_file(tensors, files / f"hs_{row.row_id}.safetensors", metadata=spec.to_metadata())
    colocated_hs = HiddenStatesConfig(colocated=True, forward_tokens=SHAPES.tokens)
    colocated = run_training(config(qwen35_verifier, data_path, tmp_path / "a", device, colocated_hs))
    from_files = run_training(
        config(qwen35_verifier, data_path, tmp_path / "b", device, HiddenStatesConfig(on_missing="raise"))
    )
    assert colocated.source_stats["colocated"]["rows"] == len(rows)  # each row computed once: the cache did the rest
    assert colocated.source_stats["memory_cache"]["device"].startswith(device.type)
    assert colocated.train_losses == pytest.approx(from_files.train_losses, rel=1e-4)
    assert colocated.val_history[-1]["tau_sim"] == pytest.approx(from_files.val_history[-1]["tau_sim"], abs=1e-3)
