"""GPU: the flex-attention chain path equals the dense reference (forward and gradients)."""

from __future__ import annotations

import pytest
import torch

from mtptune.modeling import flex_chain
from mtptune.modeling.chain_attention import document_ids
from mtptune.modeling.load import load_head

from .conftest import cuda_only, needs_device

# Flex attention is CUDA-only here: no backward on the CPU, and inductor's CPU block-mask kernel fails to compile.
pytestmark = [pytest.mark.gpu, needs_device, cuda_only]


@pytest.mark.parametrize("T", [256, 1000, 1024])
def test_flex_matches_dense(tiny_verifier, device, T):
    head, _, verifier = load_head(tiny_verifier, dtype=torch.float32, shared_dtype=torch.float32, device=device)
    torch.manual_seed(0)
    lengths = [T // 3, T // 2, T - T // 3 - T // 2]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    ids = torch.randint(0, 1000, (1, T), device=device)
    residual = torch.randn(1, T, verifier.text_config.hidden_size, device=device)
    host_masks = flex_chain.host_block_masks(document_ids(positions.cpu()), 3)  # None when T % 128 != 0
    assert (host_masks is None) == (T % 128 != 0)
    results = {}
    for backend in ("dense", "flex", "flex-host")[: 3 if host_masks else 2]:
        head.zero_grad()
        masks = [flex_chain.to_device(m, positions.device) for m in host_masks] if backend == "flex-host" else None
        outputs = head(
            ids, residual, positions, num_steps=3, attention_backend="dense" if backend == "dense" else "flex",
            block_masks=masks,
        )  # fmt: skip
        loss = sum((o.float() ** 2).mean() * (k + 1) for k, o in enumerate(outputs))
        loss.backward()
        results[backend] = ([o.detach() for o in outputs], head.fc.weight.grad.detach().clone())
    for backend in results.keys() - {"dense"}:
        for a, b in zip(results["dense"][0], results[backend][0]):
            assert (a - b).norm() / a.norm() < 1e-3, backend
        ga, gb = results["dense"][1], results[backend][1]
        assert (ga - gb).norm() / ga.norm() < 1e-3, backend
