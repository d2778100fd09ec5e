"""Shared behaviour of the Qwen MTP families (Qwen3.5 dense, Qwen3.5-MoE, Qwen3-Next).

All three store the head under the top-level prefix `mtp.` with names equal to the head module's attribute
names (`mtp.fc`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.layers.0.*`, `mtp.norm`), concat
[embedding, hidden], zero-centred norms, no position-0 embedding zeroing.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from mtptune.errors import CheckpointError
from mtptune.families.base import MtpFamily
from mtptune.families.moe_experts import fuse_experts, split_experts

PREFIX = "mtp."


class QwenMtpFamily(MtpFamily):
    concat_order = "embedding_first"
    zero_centered_norms = True
    zero_embedding_at_position_0 = False

    def is_head_key(self, key: str, text_config: PretrainedConfig) -> bool:
        return key.startswith(PREFIX)

    def native_to_head(self, native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stray = [k for k in native if not k.startswith(PREFIX)]
        if stray:
            raise CheckpointError(f"not an MTP tensor of {self.name}: {stray[0]!r}")
        return fuse_experts({k[len(PREFIX) :]: v for k, v in native.items()})

    def head_to_native(self, head: dict[str, torch.Tensor], native_keys: set[str]) -> dict[str, torch.Tensor]:
        # Keep experts fused exactly where the verifier stores them fused (docs/contracts.md, "Fused experts").
        keep_fused = {k[len(PREFIX) :] for k in native_keys if k.endswith((".gate_up_proj", ".down_proj"))}
        keep_fused = {k for k in keep_fused if ".experts." in k}
        return {PREFIX + k: v for k, v in split_experts(head, keep_fused=keep_fused).items()}
