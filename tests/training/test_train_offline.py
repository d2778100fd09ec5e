"""End-to-end offline training on the learnable verifier: learning, checkpoints, resume, never stepping on
zero loss, and the --on-missing policies."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace

import pytest
import torch
import yaml

from mtptune.errors import DataError
from mtptune.modeling.load import load_head
from mtptune.testing.learnable import write_prepared_rows
from mtptune.training import checkpointing as ckpt
from mtptune.training.config import DataConfig, HiddenStatesConfig
from mtptune.training.train import run_training

from .conftest import offline_config


def test_training_raises_validation_tau_sim_and_writes_the_checkpoint_layout(learnable, tmp_path):
    save = tmp_path / "ckpt"
    config = replace(offline_config(learnable, save, epochs=3), command=("mtptune", "train", "--epochs", "3"))
    result = run_training(config)
    before, after = result.val_before["tau_sim"], result.val_history[-1]["tau_sim"]
    print(f"val tau_sim before {before:.3f} after {after:.3f}")
    assert before < 1.2 and after > before + 1.0  # K=3: tau_sim in [1, 4]
    assert result.val_history[-1]["acc_step_0"] > 0.8

    # Layout (docs/contracts.md, "Output folders"): epoch folders, relative links, best = highest val tau_sim.
    assert [p.name for p in sorted(save.iterdir()) if p.is_dir() and not p.is_symlink()] == ["0", "1", "2"]
    for e in range(3):
        assert os.readlink(save / f"epoch{e}_end") == str(e)
    taus = [v["tau_sim"] for v in result.val_history]
    assert os.readlink(save / "checkpoint_best") == str(taus.index(max(taus)))
    best = save / "checkpoint_best"
    assert json.loads((best / "val_metrics.json").read_text())["tau_sim"] == max(taus)
    assert json.loads((best / "config.json").read_text())["num_speculative_steps"] == 3
    state = json.loads((save / "2" / "training_state.json").read_text())
    assert state["epoch"] == 3 and state["local_step"] == 0 and state["global_step"] == result.global_step
    assert yaml.safe_load((save / "run.yaml").read_text())["num_speculative_steps"] == 3
    assert (save / "train_command.txt").read_text().strip() == "mtptune train --epochs 3"
    assert (save / "metrics.jsonl").read_text().count('"split": "val"') == 4

    # The checkpoint is a head `--from-pretrained` and `stitch` accept: bf16, mtp.* names, loads onto the verifier.
    head, head_config, _ = load_head(best, learnable.verifier, dtype=torch.float32)
    assert head_config.mtp_input_norm == "post_norm"
    master = torch.load(best / "master_weights.pt", weights_only=True)
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, master[key].to(torch.bfloat16).float())

    # A finished run resumes to nothing.
    again = run_training(config)
    assert again.global_step == result.global_step and again.train_losses == []


def test_resume_continues_bit_identically(learnable, tmp_path):
    def config(save):
        return offline_config(
            learnable, save, data=DataConfig(str(learnable.data), 128, 0.8, max_rows=64), validate_at_start=False
        )

    straight = run_training(config(tmp_path / "a"))
    assert straight.global_step >= 8
    first = run_training(config(tmp_path / "b"), should_stop=lambda step: step == 5)
    assert first.interrupted and (tmp_path / "b" / "interrupted" / "config.json").is_file()
    assert first.train_losses == straight.train_losses[:5]
    rest = run_training(config(tmp_path / "b"))
    assert not rest.interrupted
    assert first.train_losses + rest.train_losses == straight.train_losses  # exact, not approximate
    a = torch.load(tmp_path / "a" / "1" / "master_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "1" / "master_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mid_epoch_resume_of_an_older_packing_warns(learnable, tmp_path, caplog):
    """A checkpoint written mid-epoch before first-fit packing (no `packing` in training_state.json) resumes, but the
    rest of its epoch is a different plan: said loudly, not silently."""
    config = offline_config(
        learnable, tmp_path, data=DataConfig(str(learnable.data), 128, 0.8, max_rows=64), validate_at_start=False
    )
    assert run_training(config, should_stop=lambda step: step == 3).interrupted
    state_file = tmp_path / "interrupted" / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state["packing"].startswith("first-fit") and state["local_step"] > 0
    del state["packing"]
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        assert not run_training(config).interrupted
    assert any("packed rows next-fit" in r.getMessage() for r in caplog.records), caplog.text


def test_all_unsupervised_batches_take_no_optimizer_step_and_save_nothing(learnable, tmp_path):
    """No step without a supervised token; and a run that trained on nothing writes no checkpoint (issue 22: an
    untrained checkpoint_best would reach stitch) but stops with exit 2 at the end of its first epoch."""
    rows = [{"input_ids": r["input_ids"], "loss_mask": [0] * len(r["loss_mask"])} for r in learnable.rows[:12]]
    data = write_prepared_rows(rows, tmp_path / "data")
    hs = HiddenStatesConfig(on_missing="raise", hidden_states_path=str(learnable.data / "hidden_states"))
    save = tmp_path / "ckpt"
    config = offline_config(learnable, save, data=DataConfig(str(data), 128, 1.0), hidden_states=hs)
    with pytest.raises(DataError, match="epoch 0 ended and the head has not been trained"):
        run_training(config)
    train = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    assert train and all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in train)  # every step skipped
    assert ckpt.complete_checkpoints(save) == [] and not (save / "checkpoint_best").exists()
    assert not (save / ".train.lock").exists()  # the run lock went with the run


def test_on_missing_skip_counts_and_raise_fails(learnable, tmp_path):
    partial = tmp_path / "hs"
    partial.mkdir()
    for i in range(0, 40, 2):  # only even rows have files
        shutil.copy(learnable.data / "hidden_states" / f"hs_{i}.safetensors", partial)
    data = DataConfig(str(learnable.data), 256, 0.5, max_rows=40)
    skip = HiddenStatesConfig(on_missing="skip", hidden_states_path=str(partial))
    result = run_training(offline_config(learnable, tmp_path / "a", data=data, hidden_states=skip, epochs=1))
    # 20 train rows (10 missing) + 20 val rows (10 missing) validated twice (before and after).
    counts = {k: result.source_stats[k] for k in ("loaded", "missing", "invalid", "failed")}
    assert counts == {"loaded": 10 + 20, "missing": 10 + 20, "invalid": 0, "failed": 0}
    assert result.source_stats["train_row_uses_total"] == 10 and result.source_stats["truncated_rows"] == 0
    with pytest.raises(DataError, match=r"hs_\d*[13579]\.safetensors is missing"):
        run_training(
            offline_config(
                learnable, tmp_path / "b", data=data, hidden_states=replace(skip, on_missing="raise"), epochs=1
            )
        )


def test_max_steps_stops_exactly_even_at_an_epoch_boundary(learnable, tmp_path):
    from mtptune.data.rows import PreparedRows
    from mtptune.training.batching import pack_rows, split_train_val

    data = DataConfig(str(learnable.data), 128, 0.8, max_rows=32)
    rows = PreparedRows(learnable.data, 128, 32)
    train_ids, _ = split_train_val(len(rows), 0.8)
    first_epoch = len(pack_rows(train_ids, rows.lengths, 128, seed=0, epoch=0))
    for max_steps in (first_epoch, first_epoch + 1):
        config = offline_config(learnable, tmp_path / str(max_steps), data=data, max_steps=max_steps)
        result = run_training(replace(config, validate_at_start=False))
        assert result.global_step == len(result.train_losses) == max_steps


def test_val_every_validates_each_step_once_and_the_epoch_end_once(learnable, tmp_path):
    """--val-every 2 over epochs of an even number of steps: the epoch's last step is a multiple of 2, and the
    epoch-end validation that follows it is the only one there (it used to run twice at that step)."""
    from mtptune.data.rows import PreparedRows
    from mtptune.training.batching import pack_rows, split_train_val

    data = DataConfig(str(learnable.data), 128, 0.8, max_rows=48)
    rows = PreparedRows(learnable.data, 128, 48)
    train_ids, _ = split_train_val(len(rows), 0.8)
    per_epoch = [len(pack_rows(train_ids, rows.lengths, 128, seed=0, epoch=e)) for e in (0, 1)]
    assert per_epoch[0] % 2 == 0, f"the test needs an even first epoch, got {per_epoch}"
    config = offline_config(learnable, tmp_path / "run", data=data, val_every=2, validate_at_start=False)
    run_training(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in records if r["split"] == "val"]
    ends = [per_epoch[0], per_epoch[0] + per_epoch[1]]
    assert val_steps == sorted(set(range(2, ends[1] + 1, 2)) | set(ends)), (val_steps, per_epoch)
