"""The GPU suite's device switch and shared fixtures.

`pytest -m gpu tests/gpu` runs on CUDA when a device is present and skips every test otherwise. Setting
`MTPTUNE_GPU_TEST_DEVICE=cpu` runs the same tests on the CPU for development (the "device" run then is a CPU run with
bf16 autocast; CUDA-only kernels such as flex attention are skipped, padding and compiles are not exercised), so the
test logic can be checked on a machine without a GPU. `MTPTUNE_GPU_TEST_DEVICE=cuda:1` picks another card.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mtptune.testing.tiny import TinySpec, build_model, write_tiny_verifier

ENV_VAR = "MTPTUNE_GPU_TEST_DEVICE"


def _device() -> str | None:
    name = os.environ.get(ENV_VAR, "").strip()
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else None


DEVICE: str | None = _device()
ON_CUDA = DEVICE is not None and torch.device(DEVICE).type == "cuda"

# Every module of the suite: `pytestmark = [pytest.mark.gpu, needs_device]`.
needs_device = pytest.mark.skipif(
    DEVICE is None, reason=f"needs a CUDA device (or {ENV_VAR}=cpu to run the GPU suite on the CPU)"
)
cuda_only = pytest.mark.skipif(not ON_CUDA, reason=f"CUDA-only kernel; {ENV_VAR}={DEVICE} runs on the CPU")


@pytest.fixture(scope="session")
def device() -> torch.device:
    assert DEVICE is not None
    dev = torch.device(DEVICE)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{ENV_VAR}={DEVICE} but torch.cuda is not available")
    return dev


LM_HEAD_SCALE = 30.0


@pytest.fixture(scope="session")
def qwen35_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen3.5 (ConditionalGeneration layout, bf16 on disk, 3 Gated-DeltaNet layers + 1 full-attention
    layer, native `mtp.*` head) in one safetensors file.

    The LM head is scaled up (logits std ~5 instead of ~0.15): with near-uniform logits every CE is ~ln(V) whatever
    the head computes, and a numerics bug would hardly move the loss the tests compare.
    """
    spec = TinySpec(family="qwen3_5")
    model = build_model(spec)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return write_tiny_verifier(tmp_path_factory.mktemp("gpu-verifier") / "tiny-qwen3_5", spec, model=model)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """CPU reference runs of tiny models: one thread is faster than contending ones on a small shared box. Session
    scope, so that it is in place before the module-scoped fixtures that run the references."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (b is the reference)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
