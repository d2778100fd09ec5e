"""Online and hybrid training through a real built-in hidden-state server subprocess."""

from __future__ import annotations

import os
from dataclasses import replace

from mtptune.testing.server_process import running_server
from mtptune.training.config import DataConfig, HiddenStatesConfig
from mtptune.training.train import run_training

from .conftest import offline_config


def test_online_delete_run_leaves_no_hidden_state_files_and_learns(learnable, tmp_path):
    storage, cache = tmp_path / "server_hs", tmp_path / "cache"
    with running_server(learnable.verifier, storage) as base:
        hs = HiddenStatesConfig(
            endpoints=(base + "/v1",), hidden_states_path=str(cache), on_missing="generate", on_generate="delete",
            concurrency=4, prefetch=8, memory_cache_gib=0,  # every epoch asks the server again
        )  # fmt: skip
        config = offline_config(
            learnable, tmp_path / "ckpt", data=DataConfig(str(learnable.data), 256, 0.8, max_rows=80), hidden_states=hs
        )
        result = run_training(config)
    assert (tmp_path / "ckpt" / "checkpoint_best" / "model.safetensors").is_file()
    assert result.val_history[-1]["tau_sim"] > result.val_before["tau_sim"] + 0.5
    leftovers = [p.name for d in (storage, cache) if d.exists() for p in d.iterdir()]
    assert leftovers == [], leftovers
    server = result.source_stats["server"]
    # 64 train rows x 2 epochs + 16 val rows x 3 validations, all generated, none cached, none lost.
    assert server["generated"] == server["succeeded"] == 64 * 2 + 16 * 3 and server["failed"] == 0
    assert result.source_stats["loaded"] == server["succeeded"]


def test_hybrid_cache_run_generates_once_then_reads_the_cache(learnable, tmp_path):
    storage, cache = tmp_path / "server_hs", tmp_path / "cache"
    with running_server(learnable.verifier, storage) as base:
        hs = HiddenStatesConfig(
            endpoints=(base + "/v1",),
            hidden_states_path=str(cache),
            on_generate="cache",
            concurrency=4,
            memory_cache_gib=0,  # epoch 1 reads the disk cache
        )
        config = offline_config(
            learnable, tmp_path / "ckpt", data=DataConfig(str(learnable.data), 256, 0.75, max_rows=16), hidden_states=hs
        )
        result = run_training(replace(config, validate_at_start=False))
    server = result.source_stats["server"]
    assert server["generated"] == 16 and server["cache_hits"] == 12 + 4  # epoch 1 and the 2nd validation
    assert sorted(os.listdir(cache)) == sorted(f"hs_{i}.safetensors" for i in range(16))
    assert [p for p in storage.iterdir() if p.suffix in (".safetensors", ".lock")] == []
