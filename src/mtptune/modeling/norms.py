"""Functional RMSNorm in both conventions (docs/contracts.md, "RMSNorm"): fp32 arithmetic, cast back at the end."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    """Qwen (zero-centred): cast(x̂ · (1 + w)); Llama: w · cast(x̂). x̂ = x / sqrt(mean(x²) + eps) in fp32."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    # HF/vLLM multiply in the activation dtype; an fp32 weight (the verifier norm is kept fp32) must not promote.
    return (weight * normed.to(x.dtype)).to(x.dtype)
