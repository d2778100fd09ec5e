"""Llama (`llama`, e.g. SmolLM2) -> no native MTP head anywhere; mtptune attaches a fresh one (families/attached.py).

Layout and names as Qwen3.5's (`mtp.fc`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.layers.0.*`,
`mtp.norm`), concat `[emb, hidden]`, the block is transformers' `LlamaDecoderLayer`, and every norm is Llama-style
(`x̂ · w`, weights near 1), like the verifier's own. vLLM cannot serve MTP for Llama (it has no `LlamaMTP` drafter
and its speculative method `mtp` rejects the architecture): evaluate such heads with mtptune's own evaluator.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama import modeling_llama as modeling

from mtptune.families.attached import AttachedHeadFamily


class LlamaFamily(AttachedHeadFamily):
    name = "llama"
    model_types = ("llama",)
    zero_centered_norms = False

    def build_decoder_layer(self, text_config: PretrainedConfig) -> nn.Module:
        return modeling.LlamaDecoderLayer(text_config, self.full_attention_layer_index(text_config))

    def build_rotary(self, text_config: PretrainedConfig) -> nn.Module:
        return modeling.LlamaRotaryEmbedding(text_config)

    def build_norm(self, dim: int, eps: float) -> nn.Module:
        return modeling.LlamaRMSNorm(dim, eps=eps)
