"""GPU: the flex-attention chain path equals the dense reference (forward and gradients)."""

from __future__ import annotations

import pytest
import torch

from mtptune.modeling.load import load_head

from .conftest import cuda_only, needs_device

# Flex attention is CUDA-only here: no backward on the CPU, and inductor's CPU block-mask kernel fails to compile.
pytestmark = [pytest.mark.gpu, needs_device, cuda_only]


@pytest.mark.parametrize("T", [256, 1000])
def test_flex_matches_dense(tiny_verifier, device, T):
    head, _, verifier = load_head(tiny_verifier, dtype=torch.float32, shared_dtype=torch.float32, device=device)
    torch.manual_seed(0)
    lengths = [T // 3, T // 2, T - T // 3 - T // 2]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    ids = torch.randint(0, 1000, (1, T), device=device)
    residual = torch.randn(1, T, verifier.text_config.hidden_size, device=device)
    results = {}
    for backend in ("dense", "flex"):
        head.zero_grad()
        outputs = head(ids, residual, positions, num_steps=3, attention_backend=backend)
        loss = sum((o.float() ** 2).mean() * (k + 1) for k, o in enumerate(outputs))
        loss.backward()
        results[backend] = ([o.detach() for o in outputs], head.fc.weight.grad.detach().clone())
    for a, b in zip(results["dense"][0], results["flex"][0]):
        assert (a - b).norm() / a.norm() < 1e-3
    ga, gb = results["dense"][1], results["flex"][1]
    assert (ga - gb).norm() / ga.norm() < 1e-3
