"""The server's kernel warm-up runs once per machine and configuration (`serving/warmup_record.py`)."""

from __future__ import annotations

import pytest

from mtptune.serving.warmup_record import record_path, should_warm_up, warmup_fingerprint, write_record

CONFIG = {"model_type": "qwen3_5_text", "hidden_size": 64, "_name_or_path": "/tmp/a/verifier"}


def _fingerprint(config=CONFIG, max_rows=64):
    return warmup_fingerprint(config, "torch.bfloat16", "NVIDIA H200", max_rows=max_rows, widths=[128, 129])


def test_auto_warms_up_until_a_finished_warmup_left_its_record(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "1")
    fingerprint = _fingerprint()
    record = record_path(fingerprint)
    assert record is not None and record.is_relative_to(tmp_path / "triton")  # removing the cache removes it
    assert should_warm_up("auto", record)
    write_record(record, fingerprint, 23.8)
    assert not should_warm_up("auto", record)
    assert should_warm_up("always", record)
    assert not should_warm_up("never", None)
    # The same architecture elsewhere on disk is the same kernels; another architecture or plan is not.
    assert record_path(_fingerprint({**CONFIG, "_name_or_path": "/tmp/b/verifier"})) == record
    assert record_path(_fingerprint({**CONFIG, "hidden_size": 128})) != record
    assert record_path(_fingerprint(max_rows=32)) != record
    assert list(record.parent.iterdir()) == [record]  # written atomically: no temporary file left


def test_without_persisted_tuning_every_start_warms_up(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")  # Triton tunes again at every start: the warm-up pays
    assert record_path(_fingerprint()) is None
    assert should_warm_up("auto", None)
    with pytest.raises(ValueError, match="auto, always, never"):
        should_warm_up("sometimes", None)
