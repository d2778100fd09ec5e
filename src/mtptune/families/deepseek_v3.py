"""DeepSeek-V3/R1 (`deepseek_v3`) -> vLLM `DeepSeekMTP`; GLM-4.5/4.6 (`glm4_moe`) -> vLLM `Glm4MoeMTP`.
vLLM serves both with speculative method `mtp`.

On disk (docs/families.md) MTP depth i is an extra decoder layer `model.layers.{N+i}` (N = num_hidden_layers; 61 for
DeepSeek-V3, 46 for GLM-4.5-Air, 92 for GLM-4.5) holding `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`,
`shared_head.head`, `embed_tokens` and a full decoder block (`self_attn.*`: MLA for DeepSeek, GQA with biases and
optional q/k norms for GLM; `mlp.*`: routed experts per-expert + `shared_experts` + sigmoid router `gate` with its
fp32 `e_score_correction_bias`; `input_layernorm`, `post_attention_layernorm`).

vLLM: `u = eh_proj([enorm(E[y]) with E zeroed at position 0 ; hnorm(g)])`, `x = block(u)`,
logits `shared_head.head(shared_head.norm(x))`, and the recycled hidden is the post-`shared_head.norm` state
(vllm#45895), exactly `MtpHead` with `norm = shared_head.norm`. Norms are Llama-style (`x̂ · w`).
`shared_head.head` and `embed_tokens` are copies of the verifier's LM head and embedding that vLLM replaces by the
target's ("Sharing target model embedding/lm_head weights"): they are MTP tensors (convert's strictness accounts
for them) but not head parameters; convert skips them and stitch leaves them bit-identical.
"""

from __future__ import annotations

import re

from torch import nn
from transformers import PretrainedConfig
from transformers.models.deepseek_v3 import modeling_deepseek_v3
from transformers.models.glm4_moe import modeling_glm4_moe

from mtptune.families.depth_prefixed import DepthPrefixedFamily


class DeepseekStyleFamily(DepthPrefixedFamily):
    concat_order = "embedding_first"
    zero_centered_norms = False
    zero_embedding_at_position_0 = True
    fp32_buffers = ("e_score_correction_bias",)
    key_pattern = re.compile(r"^(?P<prefix>model\.layers\.(?P<index>\d+)\.)(?P<rest>.+)$")
    renames = (
        ("enorm", "pre_fc_norm_embedding"),
        ("hnorm", "pre_fc_norm_hidden"),
        ("eh_proj", "fc"),
        ("shared_head.norm", "norm"),
    )
    frozen = ("shared_head.head", "embed_tokens")

    def first_mtp_index(self, text_config: PretrainedConfig) -> int:
        return text_config.num_hidden_layers

    def native_prefix(self, text_config: PretrainedConfig, depth: int = 0) -> str:
        return f"model.layers.{text_config.num_hidden_layers + depth}."

    def num_mtp_layers(self, text_config: PretrainedConfig) -> int:
        return int(getattr(text_config, "num_nextn_predict_layers", 0) or 0)

    def full_attention_layer_index(self, text_config: PretrainedConfig) -> int:
        # The real MTP index, as vLLM builds it: >= first_k_dense_replace, so the block gets the MoE MLP.
        return text_config.num_hidden_layers


class DeepseekV3Family(DeepseekStyleFamily):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def build_decoder_layer(self, text_config: PretrainedConfig) -> nn.Module:
        return modeling_deepseek_v3.DeepseekV3DecoderLayer(text_config, self.full_attention_layer_index(text_config))

    def build_rotary(self, text_config: PretrainedConfig) -> nn.Module:
        return modeling_deepseek_v3.DeepseekV3RotaryEmbedding(text_config)

    def build_norm(self, dim: int, eps: float) -> nn.Module:
        return modeling_deepseek_v3.DeepseekV3RMSNorm(dim, eps=eps)


class Glm4MoeFamily(DeepseekStyleFamily):
    name = "glm4_moe"
    model_types = ("glm4_moe",)

    def build_decoder_layer(self, text_config: PretrainedConfig) -> nn.Module:
        return modeling_glm4_moe.Glm4MoeDecoderLayer(text_config, self.full_attention_layer_index(text_config))

    def build_rotary(self, text_config: PretrainedConfig) -> nn.Module:
        return modeling_glm4_moe.Glm4MoeRotaryEmbedding(text_config)

    def build_norm(self, dim: int, eps: float) -> nn.Module:
        return modeling_glm4_moe.Glm4MoeRMSNorm(dim, eps=eps)
