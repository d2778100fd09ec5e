"""Teacher-forced tau_sim: a head trained to be right scores high, a random head ~0, every head source agrees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtptune.checkpoint.head_checkpoint import load_head_checkpoint
from mtptune.checkpoint.verifier import Verifier
from mtptune.data.rows import load_rows
from mtptune.errors import DataError
from mtptune.evaluation.offline import OfflineTally, draft_rows, evaluate_offline
from mtptune.modeling.load import load_head

from .trained_tiny import NUM_STEPS, TinySetup, direct_source


def offline(tiny: TinySetup, head_source: Path, verifier: Path | None = None) -> OfflineTally:
    head, _, _ = load_head(head_source, str(verifier or tiny.verifier_dir))
    return evaluate_offline(head, tiny.eval_rows, direct_source(tiny), NUM_STEPS)


def test_draft_rows_need_all_k_targets_in_document_and_supervised() -> None:
    mask = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 1])
    # K=2: slot t needs positions t+2 and t+3 supervised and < 10.
    assert draft_rows(mask, 2).nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert not draft_rows(torch.ones(3, dtype=torch.long), 2).any()


def test_trained_head_is_accepted_and_random_head_is_not(tiny: TinySetup) -> None:
    trained = offline(tiny, tiny.trained_head)
    random = offline(tiny, tiny.random_head)
    assert trained.counts.drafts == random.counts.drafts > 200
    assert trained.counts.acceptance_length > 2.0
    p = trained.counts.unconditional
    assert p[0] >= p[1] >= p[2]
    assert random.counts.acceptance_length < 1.05
    # The rows are the verifier's greedy text, so labels and greedy references coincide.
    assert trained.label_accuracy[0] == pytest.approx(p[0], abs=0.02)


def test_stitched_verifier_gives_the_same_tau_sim_as_the_head_checkpoint(tiny: TinySetup, tmp_path: Path) -> None:
    stitched = tmp_path / "stitched"
    stitched.mkdir()
    for f in tiny.verifier_dir.iterdir():
        (stitched / f.name).write_bytes(f.read_bytes())
    verifier = Verifier.open(str(tiny.verifier_dir))
    _, head_state = load_head_checkpoint(tiny.trained_head)
    tensors = load_file(stitched / "model.safetensors")
    native = verifier.family.head_to_native(head_state, {k for k in tensors if k.startswith("mtp.")})
    tensors.update({k if k.startswith("mtp.") else "mtp." + k: v for k, v in native.items()})
    save_file(tensors, stitched / "model.safetensors", metadata={"format": "pt"})

    from_checkpoint = offline(tiny, tiny.trained_head)
    from_stitched = offline(tiny, stitched, verifier=stitched)
    assert from_stitched.counts == from_checkpoint.counts


def test_rows_from_a_prepared_dataset_and_a_jsonl_are_the_same(tiny: TinySetup, tmp_path: Path) -> None:
    from datasets import Dataset

    rows = tiny.eval_rows[:3]
    Dataset.from_dict(
        {
            "input_ids": [r.input_ids.tolist() for r in rows],
            "loss_mask": [r.loss_mask.tolist() for r in rows],
            "seq_len": [len(r) for r in rows],
        }
    ).save_to_disk(str(tmp_path / "prepared"))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"input_ids": r.input_ids.tolist(), "loss_mask": r.loss_mask.tolist()}) + "\n" for r in rows)
    )
    assert load_rows(tmp_path / "prepared") == rows
    assert load_rows(jsonl, max_rows=2) == rows[:2]


def test_malformed_rows_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3], "loss_mask": [1, 1]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1.*loss_mask"):
        load_rows(bad)
