"""Shared fixtures: real tiny verifiers in the real on-disk layouts (built once per session)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from mtptune.testing.tiny import TinySpec, write_tiny_verifier

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A suite started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and so
# would every process it starts: the Ctrl-C tests would then see no interrupt at all. Ignored is not what they test.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Every family x layout the foundation must round-trip (issue 2's done-when list).
SPECS = {
    "qwen3_5-conditional-untied-sharded": TinySpec(family="qwen3_5", shards=3),
    "qwen3_5-text-tied-single": TinySpec(family="qwen3_5", layout="text", tied=True),
    "qwen3_5_moe-per_expert-sharded": TinySpec(family="qwen3_5_moe", shards=2),
    "qwen3_5_moe-fused-single": TinySpec(family="qwen3_5_moe", mtp_experts="fused"),
    "qwen3_5_moe-text-fused-tied": TinySpec(family="qwen3_5_moe", layout="text", mtp_experts="fused", tied=True),
    "qwen3_next-per_expert-sharded": TinySpec(family="qwen3_next", shards=2),
}


@pytest.fixture(scope="session")
def tiny_verifiers(tmp_path_factory) -> dict[str, os.PathLike]:
    root = tmp_path_factory.mktemp("verifiers")
    return {name: write_tiny_verifier(root / name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def tiny_verifier(tiny_verifiers):
    """The default: Qwen3.5 ConditionalGeneration layout, untied, sharded."""
    return tiny_verifiers["qwen3_5-conditional-untied-sharded"]


@pytest.fixture
def one_thread():
    """Tiny matmuls on a 2-core box: one thread is several times faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
