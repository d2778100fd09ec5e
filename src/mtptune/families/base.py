"""The one small interface every model family implements.

A family knows only what differs between MTP architectures: where the head's tensors live on disk and how
they map to the head module's parameter names, where the verifier keeps the shared embed / lm_head / final
norm, the norm style, the concat order, and which transformers decoder-layer class builds the MTP block.
The K-step recursion, losses and metrics are written once, elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from mtptune.errors import CheckpointError

ConcatOrder = Literal["embedding_first", "hidden_first"]


@dataclass(frozen=True)
class SharedTensorNames:
    """Names of the verifier tensors the head shares (never trained, never stitched)."""

    embed: str
    lm_head: str  # equals `embed` for tied embeddings
    final_norm: str


class MtpFamily(ABC):
    """Model-family knowledge for one native MTP layout."""

    name: str
    model_types: tuple[str, ...]
    concat_order: ConcatOrder = "embedding_first"
    zero_centered_norms: bool = True  # Qwen norms store w and apply (1 + w)
    zero_embedding_at_position_0: bool = False  # DeepSeek / GLM / MiMo zero it; Qwen does not
    # Head buffers that stay fp32 whatever the head dtype (transformers' `_keep_in_fp32_modules_strict`, e.g.
    # DeepSeek's router `e_score_correction_bias`, stored fp32 on disk): keeps the round trip bit-exact.
    fp32_buffers: tuple[str, ...] = ()
    # A family whose verifiers have no native head: mtptune creates one (`convert --init`) and `stitch` attaches it
    # as new `mtp.*` tensors plus config fields instead of replacing existing ones (families/attached.py).
    attaches_head: bool = False

    # --- config ---------------------------------------------------------------------------------
    def load_config(self, root: Path, config_dict: dict) -> PretrainedConfig:
        """The verifier's transformers config. Families whose model_type transformers lacks (MiMo) override this."""
        return AutoConfig.from_pretrained(root)

    def text_config(self, config: PretrainedConfig) -> PretrainedConfig:
        return config.get_text_config()

    @abstractmethod
    def num_mtp_layers(self, text_config: PretrainedConfig) -> int:
        """How many MTP layers the verifier's config declares (0 when it has no head)."""

    def full_attention_layer_index(self, text_config: PretrainedConfig) -> int:
        """Index used to instantiate the MTP block as a full-attention layer (the last one, like speculators)."""
        layer_types = getattr(text_config, "layer_types", None)
        if not layer_types:
            return text_config.num_hidden_layers - 1
        full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
        if not full:
            raise CheckpointError(f"{self.name}: config.layer_types has no 'full_attention' layer to build the head.")
        return full[-1]

    # --- tensors on disk ------------------------------------------------------------------------
    @abstractmethod
    def is_head_key(self, key: str, text_config: PretrainedConfig) -> bool:
        """Whether a verifier tensor belongs to the MTP head (`text_config` places layer-indexed heads)."""

    def is_frozen_head_key(self, key: str) -> bool:
        """An MTP tensor that is not part of the trainable head: a per-layer copy of a verifier tensor that vLLM
        replaces with the target's (DeepSeek's `shared_head.head`, `embed_tokens`). Convert skips it; stitch leaves
        it bit-identical."""
        return False

    @abstractmethod
    def native_to_head(self, native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Verifier on-disk MTP tensors -> head module state dict (in-memory layout, e.g. fused experts)."""

    @abstractmethod
    def head_to_native(self, head: dict[str, torch.Tensor], native_keys: set[str]) -> dict[str, torch.Tensor]:
        """Head module state dict -> the verifier's own on-disk names and layout (`native_keys` tells the layout)."""

    def shared_tensor_names(
        self, keys: Collection[str], text_config: PretrainedConfig, source: object = ""
    ) -> SharedTensorNames:
        """Where the verifier folder `source`, holding tensors `keys`, keeps the tensors the head shares."""
        embed = _find_suffix(keys, "embed_tokens.weight")
        norm = _final_norm_key(keys)
        if embed is None or norm is None:
            raise CheckpointError(
                f"{source}: cannot find the verifier's embed_tokens / final norm tensors "
                f"(looked for '*embed_tokens.weight' and '*norm.weight' outside mtp.*)."
            )
        # On-disk truth: tied checkpoints (Qwen3.5-0.8B) simply have no lm_head.weight.
        lm_head = "lm_head.weight" if "lm_head.weight" in keys else embed
        return SharedTensorNames(embed=embed, lm_head=lm_head, final_norm=norm)

    # --- modules --------------------------------------------------------------------------------
    @abstractmethod
    def build_decoder_layer(self, text_config: PretrainedConfig) -> nn.Module:
        """The MTP block: the verifier's own full-attention decoder layer class."""

    @abstractmethod
    def build_rotary(self, text_config: PretrainedConfig) -> nn.Module:
        """The verifier's rotary-embedding module; called as rotary(x, position_ids) -> (cos, sin)."""

    @abstractmethod
    def build_norm(self, dim: int, eps: float) -> nn.Module:
        """The family's RMSNorm (zero-centred for Qwen)."""


def _find_suffix(keys: Collection[str], suffix: str) -> str | None:
    """The shortest key ending in `suffix` (e.g. 'embed_tokens.weight') outside the MTP head."""
    hits = sorted((k for k in keys if k == suffix or k.endswith("." + suffix)), key=len)
    hits = [k for k in hits if not k.startswith("mtp.") and ".mtp" not in k]
    return hits[0] if hits else None


def _final_norm_key(keys: Collection[str]) -> str | None:
    for candidate in ("model.language_model.norm.weight", "model.norm.weight", "language_model.model.norm.weight"):
        if candidate in keys:
            return candidate
    return None
