"""MiMo (`mimo`, Xiaomi MiMo-7B) -> vLLM `MiMoMTP` (speculative method `mtp`).

On disk (docs/families.md): `model.mtp_layers.{i}.{token_layernorm, hidden_layernorm, input_proj, final_layernorm}` and
the Qwen2 block directly under the same prefix (`self_attn.*` with q/k/v biases, `mlp.*`, `input_layernorm`,
`post_attention_layernorm`). vLLM's `MiMoMultiTokenPredictorLayer` zeroes the embedding at position 0, normalises
both inputs with Llama-style RMSNorm (`x̂ · w`) and concatenates them **reversed**, `[hidden, emb]`, before
`input_proj`; its output `final_layernorm(block(...))` feeds the shared LM head and the next step.

MiMo-7B ships remote code (`model_type` "mimo", `MiMoForCausalLM`) that transformers does not have; its config is
Qwen2's plus `num_nextn_predict_layers`, so the family builds a `Qwen2Config` and the block from
`Qwen2DecoderLayer`.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn
from transformers import PretrainedConfig, Qwen2Config
from transformers.models.qwen2 import modeling_qwen2 as modeling

from mtptune.errors import CheckpointError
from mtptune.families.depth_prefixed import DepthPrefixedFamily

# Keys of the remote-code config that are not Qwen2 fields and must not reach Qwen2Config's type checks.
_REMOTE_ONLY = ("model_type", "auto_map")


class MiMoFamily(DepthPrefixedFamily):
    name = "mimo"
    model_types = ("mimo",)
    concat_order = "hidden_first"
    zero_centered_norms = False
    zero_embedding_at_position_0 = True
    key_pattern = re.compile(r"^(?P<prefix>model\.mtp_layers\.(?P<index>\d+)\.)(?P<rest>.+)$")
    renames = (
        ("token_layernorm", "pre_fc_norm_embedding"),
        ("hidden_layernorm", "pre_fc_norm_hidden"),
        ("input_proj", "fc"),
        ("final_layernorm", "norm"),
    )

    def load_config(self, root: Path, config_dict: dict) -> PretrainedConfig:
        body = {k: v for k, v in config_dict.items() if k not in _REMOTE_ONLY}
        try:
            return Qwen2Config(**body)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{root / 'config.json'}: not a Qwen2-shaped MiMo config: {exc}") from exc

    def native_prefix(self, text_config: PretrainedConfig, depth: int = 0) -> str:
        return f"model.mtp_layers.{depth}."

    def num_mtp_layers(self, text_config: PretrainedConfig) -> int:
        return int(getattr(text_config, "num_nextn_predict_layers", 0) or 0)

    def build_decoder_layer(self, text_config: PretrainedConfig) -> nn.Module:
        return modeling.Qwen2DecoderLayer(text_config, self.full_attention_layer_index(text_config))

    def build_rotary(self, text_config: PretrainedConfig) -> nn.Module:
        return modeling.Qwen2RotaryEmbedding(text_config)

    def build_norm(self, dim: int, eps: float) -> nn.Module:
        return modeling.Qwen2RMSNorm(dim, eps=eps)
