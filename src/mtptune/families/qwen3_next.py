"""Qwen3-Next (`qwen3_next`) -> vLLM `Qwen3NextMTP`. Flat config; depth field `num_nextn_predict_layers`
is absent from the released config and vLLM defaults it to 1."""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.models.qwen3_next import modeling_qwen3_next as modeling

from mtptune.families.qwen3_5 import Qwen3_5Family


class Qwen3NextFamily(Qwen3_5Family):
    name = "qwen3_next"
    model_types = ("qwen3_next",)
    decoder_layer_cls = modeling.Qwen3NextDecoderLayer
    rotary_cls = modeling.Qwen3NextRotaryEmbedding
    norm_cls = modeling.Qwen3NextRMSNorm

    def num_mtp_layers(self, text_config: PretrainedConfig) -> int:
        return int(getattr(text_config, "num_nextn_predict_layers", 1) or 1)
