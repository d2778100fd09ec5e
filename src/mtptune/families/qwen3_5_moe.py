"""Qwen3.5-MoE (`qwen3_5_moe`, `qwen3_5_moe_text`) -> vLLM `Qwen3_5MoeMTP`. Experts per-expert or fused on disk."""

from __future__ import annotations

from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as modeling

from mtptune.families.qwen3_5 import Qwen3_5Family


class Qwen3_5MoeFamily(Qwen3_5Family):
    name = "qwen3_5_moe"
    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    decoder_layer_cls = modeling.Qwen3_5MoeDecoderLayer
    rotary_cls = modeling.Qwen3_5MoeTextRotaryEmbedding
    norm_cls = modeling.Qwen3_5MoeRMSNorm
