"""Families that store MTP depth i under a per-depth prefix with their own names for the fuse stage.

DeepSeek-V3 / GLM-4.5 (`model.layers.{N+i}.{enorm, hnorm, eh_proj, shared_head.norm}`) and MiMo
(`model.mtp_layers.{i}.{token_layernorm, hidden_layernorm, input_proj, final_layernorm}`) differ from the head
module's names (`pre_fc_norm_embedding`, `pre_fc_norm_hidden`, `fc`, `norm`) only by a rename table; the decoder
block's tensors sit directly under the prefix (`self_attn.*`, `mlp.*`, `input_layernorm`, ...) and become
`layers.0.*`. Like vLLM's `load_weights`, the family says which names it keeps and which it skips: per-layer
copies of the verifier's embedding / LM head are MTP tensors on disk but not part of the trainable head.

One depth is supported: vLLM runs depth `step % num_mtp_layers` with its own fuse stage and KV cache, which
`MtpHead` (one fuse stage, one block) does not model. Every released DeepSeek-V3/R1, GLM-4.5/4.6 and MiMo-7B
checkpoint has one depth; a checkpoint with several fails with a clear error instead of training the wrong thing.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from transformers import PretrainedConfig

from mtptune.errors import CheckpointError
from mtptune.families.base import MtpFamily
from mtptune.families.moe_experts import fuse_experts, split_experts

BLOCK = "layers.0."


class DepthPrefixedFamily(MtpFamily):
    key_pattern: ClassVar[re.Pattern[str]]  # groups: 'prefix' (incl. trailing dot), 'index', 'rest'
    renames: ClassVar[tuple[tuple[str, str], ...]]  # (native module name under the prefix, head module name)
    frozen: ClassVar[tuple[str, ...]] = ()  # native module names under the prefix that stay the verifier's

    def first_mtp_index(self, text_config: PretrainedConfig) -> int:
        """Layer index of MTP depth 0 in `key_pattern` (DeepSeek: num_hidden_layers; MiMo: 0)."""
        return 0

    def native_prefix(self, text_config: PretrainedConfig, depth: int = 0) -> str:
        raise NotImplementedError

    # --- tensors on disk ------------------------------------------------------------------------
    def _split(self, key: str) -> tuple[str, int, str] | None:
        match = self.key_pattern.match(key)
        return (match["prefix"], int(match["index"]), match["rest"]) if match else None

    def is_head_key(self, key: str, text_config: PretrainedConfig) -> bool:
        parts = self._split(key)
        return parts is not None and parts[1] >= self.first_mtp_index(text_config)

    def is_frozen_head_key(self, key: str) -> bool:
        parts = self._split(key)
        return parts is not None and any(parts[2].startswith(name + ".") for name in self.frozen)

    def _single_prefix(self, keys: set[str] | list[str], what: str) -> str:
        prefixes = sorted({p[0] for p in map(self._split, keys) if p is not None})
        stray = [k for k in keys if self._split(k) is None]
        if stray:
            raise CheckpointError(f"not an MTP tensor of {self.name}: {stray[0]!r}")
        if len(prefixes) != 1:
            raise CheckpointError(
                f"{what}: {self.name} MTP tensors under {len(prefixes)} depth prefixes {prefixes[:4]}; mtptune "
                "trains one MTP depth (vLLM runs depth `step % num_mtp_layers`, each with its own fuse stage "
                "and KV cache). Keep depth 0 only (and set num_nextn_predict_layers to 1) to finetune this head."
            )
        return prefixes[0]

    def native_to_head(self, native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = self._single_prefix(list(native), "verifier")
        head: dict[str, torch.Tensor] = {}
        for key, value in native.items():
            rest = key[len(prefix) :]
            if self.is_frozen_head_key(key):
                continue  # the verifier's own embedding / LM head copy: vLLM shares the target's
            if rest.endswith(("_scale_inv", "weight_scale", "input_scale")):
                raise CheckpointError(
                    f"{key}: quantised (FP8) MTP weights; finetune from a BF16 checkpoint "
                    "(e.g. dequantise DeepSeek-V3's FP8 release first)."
                )
            head[self._to_head_name(rest)] = value
        return fuse_experts(head)

    def head_to_native(self, head: dict[str, torch.Tensor], native_keys: set[str]) -> dict[str, torch.Tensor]:
        trainable = {k for k in native_keys if not self.is_frozen_head_key(k)}
        prefix = self._single_prefix(trainable, "verifier")
        # Keep experts fused exactly where the verifier stores them fused (docs/contracts.md, "Fused experts").
        keep_fused = {
            self._to_head_name(k[len(prefix) :])
            for k in trainable
            if ".experts." in k and k.endswith((".gate_up_proj", ".down_proj"))
        }
        return self.to_native(head, prefix, keep_fused)

    def to_native(self, head: dict[str, torch.Tensor], prefix: str, keep_fused: set[str]) -> dict[str, torch.Tensor]:
        """Head state dict -> on-disk names under `prefix` (per-expert experts except `keep_fused`)."""
        out = {}
        for key, value in split_experts(head, keep_fused=keep_fused).items():
            out[prefix + self._to_native_name(key)] = value
        return out

    def _to_head_name(self, rest: str) -> str:
        for native, mine in self.renames:
            if rest.startswith(native + "."):
                return mine + rest[len(native) :]
        return BLOCK + rest

    def _to_native_name(self, key: str) -> str:
        if key.startswith(BLOCK):
            return key[len(BLOCK) :]
        for native, mine in self.renames:
            if key.startswith(mine + "."):
                return native + key[len(mine) :]
        raise CheckpointError(f"{self.name}: head tensor {key!r} has no place in the verifier's layout.")
