"""Colocated hidden states (the verifier in the trainer's process) and the in-memory hidden-state cache.

The colocated source must hand the head the very tensor a server hands it (layer N before the final norm); the
cache must give back exactly what it was given, drop least-recently-used rows beyond its budget, and survive a
resume (it is rebuilt, never saved).
"""

from __future__ import annotations

import shlex
from dataclasses import replace

import pytest
import torch

from mtptune.cli.main import main
from mtptune.data.rows import PreparedRows
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.load import load_head
from mtptune.serving.client import HiddenStatesClient
from mtptune.serving.colocated import ColocatedSource, ForwardShapes, plan_fixed_forwards
from mtptune.serving.contract import capture_spec
from mtptune.serving.memory_cache import HiddenStateCache
from mtptune.serving.sources import CachedSource, FolderSource, ServerSource
from mtptune.serving.verifier_runtime import VerifierRuntime
from mtptune.testing.server_process import running_server
from mtptune.training.config import DataConfig, HiddenStatesConfig
from mtptune.training.train import run_training

from .conftest import offline_config

N_LAYERS = 4  # the learnable verifier's num_hidden_layers


def test_fixed_forward_shapes_group_rows_by_width_and_pad_only_the_last() -> None:
    shapes = ForwardShapes(tokens=64, width_step=16)  # width 16 -> 4 rows, 32 -> 2 rows, 48 / 64 -> 1 row
    lengths = [10, 12, 30, 5, 16, 20, 3]
    forwards, left = plan_fixed_forwards(lengths, shapes, final=False)
    assert forwards == [(16, [0, 1, 3, 4]), (32, [6, 2])]  # row 6 (3 tokens) moved up to width 32 with row 2
    assert left == [5]
    forwards, left = plan_fixed_forwards(lengths, shapes, final=True)
    assert forwards[-1] == (32, [5]) and left == []  # the caller pads it with a dummy row
    assert sorted(i for _, members in forwards for i in members) == list(range(len(lengths)))
    assert all(len(m) <= shapes.rows_for(w) and all(lengths[i] <= w for i in m) for w, m in forwards)


def test_colocated_states_are_the_servers_and_hfs(learnable, tmp_path) -> None:
    """Layer N before the final norm, as the built-in server returns it; our final norm of it is HF's output."""
    rows = list(PreparedRows(learnable.data, max_rows=24))
    runtime = VerifierRuntime.load(str(learnable.verifier), layer_ids=[N_LAYERS], device="cpu", with_tokenizer=False)
    colocated = dict((row.row_id, r) for row, r in ColocatedSource(runtime, ForwardShapes(128, 16)).stream(rows))
    with running_server(learnable.verifier, tmp_path / "hs") as base:
        client = HiddenStatesClient([base + "/v1"], None, num_layers=1, hidden_size=runtime.hidden_size)
        source = ServerSource(client, capture_spec(N_LAYERS), prefetch=8, dtype=torch.float32)
        served = dict((row.row_id, r) for row, r in source.stream(rows))
        source.close()
    head, _, _ = load_head(str(learnable.verifier), dtype=torch.float32)
    hf = VerifierForward(runtime.model, None, torch.device("cpu"))  # type: ignore[arg-type]
    for row in rows:
        mine = colocated[row.row_id]
        assert mine.shape == (len(row), runtime.hidden_size) and mine.dtype == runtime.dtype
        # Both are bf16 forwards of the same rows, batched differently: equal up to bf16 rounding.
        assert relative_error(mine.float(), served[row.row_id]) < 1e-2
        post_norm, _ = head.residual_to_inputs(mine.float(), "post_norm")
        assert relative_error(post_norm, hf.hidden_states(row.input_ids).float()) < 1e-2


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_colocated_training_losses_equal_the_server_paths(learnable, tmp_path) -> None:
    data = DataConfig(str(learnable.data), 256, 0.8, max_rows=48)
    colocated = HiddenStatesConfig(colocated=True, forward_tokens=256)
    base_config = offline_config(learnable, tmp_path / "a", data=data, max_steps=4, validate_at_start=False)
    local = run_training(replace(base_config, hidden_states=colocated))
    with running_server(learnable.verifier, tmp_path / "hs") as url:
        served_hs = HiddenStatesConfig(endpoints=(url + "/v1",), concurrency=4, prefetch=8)
        served = run_training(
            replace(
                base_config,
                checkpoint=replace(base_config.checkpoint, save_path=str(tmp_path / "b")),
                hidden_states=served_hs,
            )
        )
    assert len(local.train_losses) == len(served.train_losses) == 4
    # Same rows, same layer-N states up to the rounding of differently batched fp32 forwards.
    assert local.train_losses == pytest.approx(served.train_losses, rel=1e-5)
    assert local.source_stats["colocated"]["rows"] > 0 and "server" not in local.source_stats


def test_memory_cache_keeps_exact_tensors_and_drops_least_recently_used() -> None:
    cache = HiddenStateCache(capacity_bytes=3 * 16 * 4)  # three rows of 4 x 4 fp32
    rows = {i: torch.randn(4, 4) for i in range(5)}
    for i in range(3):
        assert torch.equal(cache.put(i, rows[i]), rows[i])
    assert cache.get(0, 4) is not None  # row 0 is now the most recently used
    cache.put(3, rows[3])  # evicts row 1, the least recently used
    assert 1 not in cache and all(i in cache for i in (0, 2, 3))
    assert cache.get(2, length=5) is None  # another length is another row: never served
    big = torch.randn(16, 4)
    assert cache.put(4, big) is big and 4 not in cache  # larger than the whole budget: passed through
    assert cache.stats()["evicted"] == 1 and cache.stats()["too_large"] == 1
    assert cache.bytes == 3 * 16 * 4


def test_cached_source_asks_only_for_misses_and_keeps_order(learnable) -> None:
    rows = list(PreparedRows(learnable.data, max_rows=12))
    folder = FolderSource(learnable.data / "hidden_states", "raise", capture_spec(N_LAYERS), 64, torch.float32)
    reference = {row.row_id: r for row, r in folder.stream(rows)}
    size = {i: r.numel() * r.element_size() for i, r in reference.items()}
    budget = sum(size[i] for i in range(4, 12)) + min(size[i] for i in range(4)) - 1  # room for rows 4-11 only
    cached = CachedSource(folder, HiddenStateCache(capacity_bytes=budget))
    first = [(row.row_id, r) for row, r in cached.stream(rows)]
    assert [i for i, _ in first] == [row.row_id for row in rows]
    assert cached.cache.counters.stored == 12 and cached.cache.counters.evicted == 4  # rows 0-3 dropped
    order = rows[8:10] + rows[0:1] + rows[10:12]  # hits, a miss, hits: answered in this order all the same
    second = [(row.row_id, r) for row, r in cached.stream(order)]
    assert [i for i, _ in second] == [row.row_id for row in order]
    for row_id, states in second:
        assert torch.equal(states, reference[row_id])
    assert cached.cache.counters.hits == 4 and cached.cache.counters.misses == 12 + 1


def test_memory_cache_reuse_is_exact_and_survives_a_resume(learnable, tmp_path) -> None:
    data = DataConfig(str(learnable.data), 256, 0.8, max_rows=64)
    files = HiddenStatesConfig(on_missing="raise", prefetch=8)
    without = run_training(
        offline_config(learnable, tmp_path / "a", data=data, hidden_states=replace(files, memory_cache_gib=0))
    )
    cached = run_training(offline_config(learnable, tmp_path / "b", data=data, hidden_states=files))
    assert cached.train_losses == without.train_losses  # bit-identical: the cache returns the very tensors
    assert cached.source_stats["memory_cache"]["hits"] > 0
    # Interrupted after 3 steps, then resumed: the cache starts empty again and the run ends where the other did.
    config = offline_config(learnable, tmp_path / "c", data=data, hidden_states=files)
    first = run_training(config, should_stop=lambda step: step >= 3)
    assert first.interrupted
    resumed = run_training(config)
    assert first.train_losses + resumed.train_losses == without.train_losses


def test_cli_colocated_run_learns_and_writes_no_hidden_state_file(learnable, tmp_path, capsys) -> None:
    save = tmp_path / "ckpt"
    command = (
        f"train --verifier-name-or-path {learnable.verifier} --data-path {learnable.data} --save-path {save} "
        "--colocated --epochs 2 --max-rows 48 --total-seq-len 256 --lr 3e-3 --no-progress"
    )
    before = sorted(p.name for p in learnable.data.iterdir())
    assert main(shlex.split(command)) == 0
    out = capsys.readouterr().out
    assert "colocated verifier:" in out and "memory cache:" in out and "checkpoint_best" in out
    assert sorted(p.name for p in learnable.data.iterdir()) == before  # no hidden_states folder or file made
    assert (save / "checkpoint_best" / "model.safetensors").is_file()
    # The flags that make no sense colocated are refused, naming the flag.
    assert main(shlex.split(command + " --on-generate cache")) == 2
    assert "--colocated" in capsys.readouterr().err
    # A GPU cache for a trainer on the CPU would silently be a host cache: refused, naming the flag and the fix.
    on_cpu = (
        command.replace(str(save), str(tmp_path / "cpu")) + " --device cpu --hidden-states-memory-cache-device cuda"
    )
    assert main(shlex.split(on_cpu)) == 2
    err = capsys.readouterr().err
    assert "--hidden-states-memory-cache-device cuda" in err and "--device" in err, err
