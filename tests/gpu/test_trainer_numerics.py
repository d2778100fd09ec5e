"""GPU: the real trainer on the device (bf16 autocast, padding to --total-seq-len, flex chain attention, compiled
MTP steps, fused chunked LM head + compiled CE) agrees with the same run on the CPU in fp32 (dense chain attention).

Both runs read the same offline hidden-state files (bf16, written once by the CPU runtime) and start from the same
native head, so every difference is the device path's numerics: the losses and per-step metrics of each step,
the validation metrics before and after, and the fp32 master weights after the optimizer steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtptune.modeling import flex_chain
from mtptune.modeling.chain_attention import document_ids
from mtptune.modeling.head import MtpHead, shift_left
from mtptune.modeling.load import load_head
from mtptune.testing.learnable import write_hidden_state_files, write_prepared_rows
from mtptune.training import fused_linear_loss as fll
from mtptune.training.config import (
    CheckpointConfig,
    DataConfig,
    HiddenStatesConfig,
    LoggingConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
)
from mtptune.training.train import run_training

from .conftest import ON_CUDA, needs_device, rel_err

pytestmark = [pytest.mark.gpu, needs_device]

NUM_ROWS = 48
TOTAL_SEQ_LEN = 256  # packs ~4 documents per micro-batch; flex attention sees two 128-row blocks
CHUNK_ROWS = 64  # ~200 supervised rows per step k and micro-batch: 3-4 LM-head chunks, the last one shorter
MAX_STEPS = 3
GRAD_ACCUM = 2  # 6 micro-batches in 3 optimizer steps
K = 3
LR = 1e-3


@dataclass(frozen=True)
class Data:
    verifier: Path
    path: Path  # prepared rows; offline hidden states in path / "hidden_states"


def random_rows(num_rows: int, seed: int) -> list[dict[str, list[int]]]:
    """Documents of 16-96 tokens (ids 10..997: token 0 marks the trainer's padding), a prompt of 1-8 unsupervised
    tokens and an unsupervised span in the middle of some rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        n = int(torch.randint(16, 97, (1,), generator=gen))
        ids = torch.randint(10, 998, (n,), generator=gen).tolist()
        mask = [1] * n
        prompt = int(torch.randint(1, 9, (1,), generator=gen))
        mask[:prompt] = [0] * prompt
        if n > 40 and int(torch.randint(2, (1,), generator=gen)):
            mask[20:26] = [0] * 6
        rows.append({"input_ids": ids, "loss_mask": mask})
    return rows


@pytest.fixture(scope="module")
def data(qwen35_verifier: Path, tmp_path_factory: pytest.TempPathFactory) -> Data:
    rows = random_rows(NUM_ROWS, seed=3)
    path = write_prepared_rows(rows, tmp_path_factory.mktemp("gpu-train") / "data")
    write_hidden_state_files(qwen35_verifier, rows, path / "hidden_states")
    return Data(qwen35_verifier, path)


def train_config(data: Data, save: Path, device: str, dtype: str) -> TrainConfig:
    return TrainConfig(
        verifier=str(data.verifier),
        data=DataConfig(str(data.path), total_seq_len=TOTAL_SEQ_LEN, train_data_ratio=0.75),
        checkpoint=CheckpointConfig(str(save)),
        hidden_states=HiddenStatesConfig(on_missing="raise", prefetch=8),
        optim=OptimConfig(lr=LR, grad_accum=GRAD_ACCUM, scheduler="constant"),
        loss=LossConfig(kind="ce", chunk_rows=CHUNK_ROWS),
        logging=LoggingConfig(log_every=1, progress_bar=False),  # every step logged, with its verifier metrics
        num_speculative_steps=K,
        epochs=1,
        max_steps=MAX_STEPS,
        device=device,
        dtype=dtype,
        compile="step",
    )


class Spy:
    """Records what the trainer actually ran: the head's inputs per forward, flex-attention calls, CE chunks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forwards: list[dict] = []
        self.flex_calls = 0
        self.ce_chunks: list[int] = []  # rows per fused-CE chunk
        original_forward = MtpHead.forward
        original_flex = flex_chain.attention
        original_ce_fn = fll._ce_grad_fn

        def forward(head, input_ids, hidden_states, position_ids=None, *args, **kwargs):
            dev = input_ids.device.type
            record = dict(
                grad=torch.is_grad_enabled(),
                input_ids=input_ids.detach().cpu(),
                position_ids=None if position_ids is None else position_ids.detach().cpu(),
                autocast=torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev),
                step_compiled="step" in vars(head),  # compile_head's torch.compile(head.step) instance attribute
            )
            outputs = original_forward(head, input_ids, hidden_states, position_ids, *args, **kwargs)
            record["outputs"] = [o.detach().float().cpu() for o in outputs]  # o^k [1, L, H]
            self.forwards.append(record)
            return outputs

        def flex(*args, **kwargs):
            self.flex_calls += 1
            return original_flex(*args, **kwargs)

        def ce_fn(device):
            fn = original_ce_fn(device)

            def counted(logits, targets, scale):
                self.ce_chunks.append(int(logits.shape[0]))
                return fn(logits, targets, scale)

            return counted

        monkeypatch.setattr(MtpHead, "forward", forward)
        monkeypatch.setattr(flex_chain, "attention", flex)
        monkeypatch.setattr(fll, "_ce_grad_fn", ce_fn)


@dataclass
class Run:
    result: object
    train: list[dict]  # metrics.jsonl train records, by step
    val: list[dict]  # val records (before training, at the end)
    weights: dict[str, torch.Tensor]  # fp32 master weights after the last step
    spy: Spy


def run(data: Data, save: Path, device: str, dtype: str) -> Run:
    with pytest.MonkeyPatch.context() as patch:
        spy = Spy(patch)
        result = run_training(train_config(data, save, device, dtype))
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    saved = [p.parent for p in save.glob("*/master_weights.pt")]
    assert saved, f"no checkpoint with master_weights.pt under {save}"
    last = max(saved, key=lambda p: json.loads((p / "training_state.json").read_text())["global_step"])
    weights = torch.load(last / "master_weights.pt", map_location="cpu", weights_only=True)
    return Run(
        result,
        [r for r in records if r["split"] == "train"],
        [r for r in records if r["split"] == "val"],
        weights,
        spy,
    )


@pytest.fixture(scope="module")
def runs(data: Data, tmp_path_factory: pytest.TempPathFactory, device: torch.device) -> tuple[Run, Run]:
    """(CPU fp32 reference, device bf16) runs of the same 3 optimizer steps."""
    root = tmp_path_factory.mktemp("gpu-train-runs")
    reference = run(data, root / "cpu", "cpu", "float32")
    on_device = run(data, root / "device", str(device), "bfloat16")
    return reference, on_device


def test_the_device_run_used_the_fast_paths(runs: tuple[Run, Run], device: torch.device) -> None:
    reference, dev = runs
    assert dev.result.optimizer_steps == reference.result.optimizer_steps == MAX_STEPS
    train = [f for f in dev.spy.forwards if f["grad"]]
    assert len(train) == MAX_STEPS * GRAD_ACCUM
    docs = []
    for f in dev.spy.forwards:
        assert f["autocast"] == torch.bfloat16
        real = int((f["input_ids"][0] != 0).nonzero().max()) + 1  # real ids are >= 10; padding is token 0
        docs.append((f["grad"], int((f["position_ids"][0, :real] == 0).sum())))
        if ON_CUDA:
            assert f["input_ids"].shape[1] == TOTAL_SEQ_LEN, "on CUDA every micro-batch is padded to total_seq_len"
            assert f["step_compiled"]
    # First-fit packing: every training micro-batch holds several documents; a validation pass may end on a
    # leftover bin of one (12 validation rows, several passes).
    assert all(n >= 2 for grad, n in docs if grad), docs
    assert sum(n for grad, n in docs if not grad) % 12 == 0 and max(n for grad, n in docs if not grad) >= 2, docs
    for f in reference.spy.forwards:
        assert f["autocast"] is False and not f["step_compiled"]
    # The bf16 fused CE ran chunk by chunk: several full chunks and shorter tails.
    chunks = dev.spy.ce_chunks
    assert max(chunks) == CHUNK_ROWS and min(chunks) < CHUNK_ROWS
    assert len(chunks) >= 2 * K * len(dev.spy.forwards), chunks
    if ON_CUDA:
        assert dev.spy.flex_calls == K * len(dev.spy.forwards)  # one flex kernel per MTP step and forward
    assert reference.spy.flex_calls == 0
    print(
        f"device {device}: {len(dev.spy.forwards)} head forwards, lengths "
        f"{sorted({f['input_ids'].shape[1] for f in dev.spy.forwards})}, {len(chunks)} CE chunks, "
        f"{dev.spy.flex_calls} flex calls"
    )


def real_length(forward: dict) -> int:
    return int((forward["input_ids"][0] != 0).nonzero().max()) + 1  # real ids are >= 10; padding is token 0


def in_document_rows(position_ids: torch.Tensor, k: int) -> torch.Tensor:
    """[L] rows whose step-k inputs (tokens up to x_{t+k+1}) lie in their own document; the others are garbage by
    construction and never supervised."""
    doc = document_ids(position_ids[None])[0]
    return shift_left(doc[None], k + 1, fill=-1)[0] == doc


OUT_RTOL = 2e-2  # bf16 autocast vs fp32: relative error of the head outputs o^k over all rows of a forward
ROW_RTOL = 5e-2  # and of any single row


def test_head_outputs_match_the_cpu_fp32_run_per_position(runs: tuple[Run, Run]) -> None:
    """Every forward of the trainer (validation and training micro-batches, same order on both runs): the head's
    output o^k of each real row equals the CPU fp32 one, padding or not. Until the first optimizer step the weights
    are identical; after it they differ by the steps' bf16 noise, so later forwards get a looser bound."""
    reference, dev = runs
    assert len(reference.spy.forwards) == len(dev.spy.forwards)
    first_train = next(i for i, f in enumerate(reference.spy.forwards) if f["grad"])
    stepped = first_train + GRAD_ACCUM  # forwards from here on see updated weights
    worst = {"total": 0.0, "row": 0.0}
    for i, (a, b) in enumerate(zip(reference.spy.forwards, dev.spy.forwards)):
        n = real_length(a)
        assert n == a["input_ids"].shape[1] == real_length(b)  # the CPU run is never padded
        assert torch.equal(a["input_ids"][0], b["input_ids"][0, :n])
        assert torch.equal(a["position_ids"][0], b["position_ids"][0, :n])
        scale = 1.0 if i < stepped else 2.5
        for k in range(K):
            rows = in_document_rows(a["position_ids"][0], k)
            oa, ob = a["outputs"][k][0][rows], b["outputs"][k][0, :n][rows]
            total = rel_err(ob, oa)
            row = float(((ob - oa).norm(dim=-1) / oa.norm(dim=-1)).max())
            if i < stepped:
                worst = {"total": max(worst["total"], total), "row": max(worst["row"], row)}
            assert total < OUT_RTOL * scale and row < ROW_RTOL * scale, (i, k, total, row)
    print(f"head outputs before the first step: worst rel err {worst['total']:.2e}, worst row {worst['row']:.2e}")


# Tolerances for bf16 autocast vs fp32 on this tiny model (CE ~16 nats; CPU bf16 autocast measures ~5e-5). A doc
# mask that lets rows see earlier documents moves the first step's loss by ~1e-3.
LOSS_RTOL = 5e-4  # before any optimizer step: identical weights
LOSS_RTOL_STEPPED = 1e-3  # after: the weights differ by the steps' bf16 noise
ACC_ATOL = 0.03  # argmax metrics: near-ties of a random head may flip under bf16
TAU_ATOL = 0.03


def compare_records(ref: dict, dev: dict, where: str, loss_rtol: float) -> list[str]:
    """Every numeric metric both records have, with a tolerance by kind; returns the failures."""
    failures = []
    for key in sorted(set(ref) & set(dev)):
        a, b = ref[key], dev[key]
        if not isinstance(a, (int, float)) or isinstance(a, bool) or key in ("time", "step", "global_step"):
            continue
        if key.startswith(("tokens_step_", "drafts", "epoch")):
            ok = a == b  # supervised-token counts: padding must add none
        elif key == "loss" or key.startswith(("loss_step_", "ce_step_")):
            ok = math.isclose(a, b, rel_tol=loss_rtol)
        elif key.startswith(("acc_", "cond_accept_", "verifier_label")):
            ok = abs(a - b) <= ACC_ATOL
        elif key == "tau_sim":
            ok = abs(a - b) <= TAU_ATOL
        else:
            continue  # timing, lr, memory, throughput
        if not ok:
            failures.append(f"{where} {key}: cpu fp32 {a!r} vs device {b!r}")
    return failures


def test_losses_and_per_step_metrics_match_the_cpu_fp32_run(runs: tuple[Run, Run]) -> None:
    reference, dev = runs
    assert len(reference.result.train_losses) == len(dev.result.train_losses) == MAX_STEPS
    for step, (a, b) in enumerate(zip(reference.result.train_losses, dev.result.train_losses)):
        print(f"step {step + 1}: loss cpu fp32 {a:.6f} device {b:.6f} rel {abs(a - b) / a:.2e}")
    assert len(reference.train) == len(dev.train) == MAX_STEPS
    assert len(reference.val) == len(dev.val) == 2  # before training and at the (early) end of the epoch
    failures = []
    for a, b in zip(reference.train, dev.train):
        failures += compare_records(a, b, f"train step {a['step']}", LOSS_RTOL if a["step"] == 1 else LOSS_RTOL_STEPPED)
    for a, b, label in zip(reference.val, dev.val, ("before", "after")):
        print(
            f"val {label}: loss cpu {a['loss']:.6f} device {b['loss']:.6f}; tau {a['tau_sim']:.4f} {b['tau_sim']:.4f}"
        )
        failures += compare_records(a, b, f"val {label}", LOSS_RTOL if label == "before" else LOSS_RTOL_STEPPED)
    assert not failures, "\n".join(failures)
    # The head learned the same way on both: the val loss moved by the same amount.
    moved_ref = reference.val[1]["loss"] - reference.val[0]["loss"]
    moved_dev = dev.val[1]["loss"] - dev.val[0]["loss"]
    assert moved_ref < 0 and abs(moved_dev - moved_ref) <= 0.1 * abs(moved_ref), (moved_ref, moved_dev)


def test_updated_master_weights_match_the_cpu_fp32_run(runs: tuple[Run, Run], data: Data) -> None:
    """AdamW's first steps are ~lr * sign(grad), so compare the updates w - w0: an element whose gradient is within
    bf16 noise of zero may flip its sign; the update as a whole must agree."""
    reference, dev = runs
    initial, _, _ = load_head(data.verifier, dtype=torch.float32)
    w0 = {k: v.float() for k, v in initial.state_dict().items()}
    assert set(reference.weights) == set(dev.weights) == set(w0)
    d_ref = torch.cat([(reference.weights[k] - w0[k]).flatten() for k in sorted(w0)])
    d_dev = torch.cat([(dev.weights[k] - w0[k]).flatten() for k in sorted(w0)])
    assert d_ref.norm() > 0.3 * LR * math.sqrt(d_ref.numel()), "the reference steps barely moved the head"
    err = rel_err(d_dev, d_ref)
    cosine = float(torch.nn.functional.cosine_similarity(d_dev.double(), d_ref.double(), dim=0))
    sign_agree = float(((d_dev > 0) == (d_ref > 0)).double().mean())
    print(f"update: rel err {err:.3e}, cosine {cosine:.5f}, sign agreement {sign_agree:.4f}")
    per_tensor = {k: rel_err(dev.weights[k] - w0[k], reference.weights[k] - w0[k]) for k in sorted(w0)}
    worst = max(per_tensor, key=per_tensor.get)
    print(f"worst tensor update: {worst} rel err {per_tensor[worst]:.3e}")
    assert err < 0.15 and cosine > 0.99 and sign_agree > 0.99
    assert per_tensor[worst] < 0.4, per_tensor
