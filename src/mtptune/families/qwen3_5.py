"""Qwen3.5 dense (`qwen3_5`, text-only `qwen3_5_text`) -> vLLM `Qwen3_5MTP`."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig
from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

from mtptune.families.qwen import QwenMtpFamily


class Qwen3_5Family(QwenMtpFamily):
    name = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_text")
    decoder_layer_cls = modeling.Qwen3_5DecoderLayer
    rotary_cls = modeling.Qwen3_5TextRotaryEmbedding
    norm_cls = modeling.Qwen3_5RMSNorm

    def num_mtp_layers(self, text_config: PretrainedConfig) -> int:
        return int(getattr(text_config, "mtp_num_hidden_layers", 0) or 0)

    def build_decoder_layer(self, text_config: PretrainedConfig) -> nn.Module:
        return self.decoder_layer_cls(text_config, self.full_attention_layer_index(text_config))

    def build_rotary(self, text_config: PretrainedConfig) -> nn.Module:
        return self.rotary_cls(text_config)

    def build_norm(self, dim: int, eps: float) -> nn.Module:
        return self.norm_cls(dim, eps=eps)
