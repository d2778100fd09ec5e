"""Fixtures of the serving tests: a real tiny verifier and a word-level tokenizer kept apart from it.

The server launcher lives in `mtptune.testing.server_process` and the tokenizer in `mtptune.testing.word_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mtptune.testing.tiny import write_tiny_verifier
from mtptune.testing.word_tokenizer import write_word_tokenizer


@pytest.fixture(scope="session")
def tiny_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_verifier(tmp_path_factory.mktemp("verifier") / "tiny-qwen3_5")


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kept apart from the verifier: next to a qwen3_5 config.json, AutoTokenizer would force Qwen3_5Tokenizer."""
    path = tmp_path_factory.mktemp("tokenizer")
    write_word_tokenizer(path)
    return path
