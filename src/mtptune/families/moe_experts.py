"""Per-expert <-> fused MoE expert tensors (transformers 5 holds experts fused in memory).

Fused layout (docs/contracts.md, "Fused experts"): gate_up_proj [E, 2I, H] = stack_e(cat[gate_e, up_e], dim 0),
down_proj [E, H, I].
"""

from __future__ import annotations

import re

import torch

from mtptune.errors import CheckpointError

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every per-expert group with the fused pair; other keys pass through. Experts must be 0..E-1."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        match = _PER_EXPERT.match(key)
        if match is None:
            out[key] = value
            continue
        groups.setdefault(match["prefix"], {}).setdefault(int(match["e"]), {})[match["proj"]] = value
    for prefix, experts in groups.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))):
            missing = sorted(set(range(max(ids) + 1)) - set(ids))
            raise CheckpointError(f"{prefix}: experts must be contiguous 0..E-1; missing expert ids {missing[:10]}.")
        for e in ids:
            lacking = {"gate_proj", "up_proj", "down_proj"} - set(experts[e])
            if lacking:
                raise CheckpointError(f"{prefix}.{e}: missing {sorted(lacking)} weights.")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], dim=0) for e in ids]
        )
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids])
    return out


def split_experts(tensors: dict[str, torch.Tensor], keep_fused: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of `fuse_experts` for every '*.experts.gate_up_proj' / '*.experts.down_proj' not in `keep_fused`."""
    keep_fused = keep_fused or set()
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key in keep_fused or not key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[key] = value
            continue
        prefix, proj = key.rsplit(".", 1)
        if proj == "gate_up_proj":
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = value[e, :inter].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = value[e, inter:].contiguous()
        else:
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = value[e].contiguous()
    return out
