"""Tiny DeepSeek-V3, GLM-4.5 and MiMo verifiers in their real on-disk layouts (built once per session)."""

from __future__ import annotations

import os

import pytest

from mtptune.testing.tiny import TinySpec, write_tiny_verifier

FAMILY_SPECS = {
    "deepseek_v3-sharded": TinySpec(family="deepseek_v3", num_hidden_layers=2, shards=2),
    "deepseek_v3-fused-tied": TinySpec(family="deepseek_v3", num_hidden_layers=2, mtp_experts="fused", tied=True),
    "glm4_moe-sharded": TinySpec(family="glm4_moe", num_hidden_layers=2, shards=2),
    "mimo-single": TinySpec(family="mimo", num_hidden_layers=2),
}


@pytest.fixture(scope="session")
def family_verifiers(tmp_path_factory) -> dict[str, os.PathLike]:
    root = tmp_path_factory.mktemp("family_verifiers")
    return {name: write_tiny_verifier(root / name, spec) for name, spec in FAMILY_SPECS.items()}
