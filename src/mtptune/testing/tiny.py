"""Tiny verifiers in the exact on-disk layout of real checkpoints, with a native MTP head.

Layouts: Qwen3.5 / Qwen3.5-MoE as `*ForConditionalGeneration` (`model.language_model.*`, `model.visual.*`,
top-level `mtp.*`) or text-only `*ForCausalLM`; Qwen3-Next `Qwen3NextForCausalLM`. MTP experts per-expert or
fused on disk; tied or untied embeddings; single file or sharded with `model.safetensors.index.json`.
DeepSeek-V3 / GLM-4.5: the head as the extra decoder layer `model.layers.{N}` (enorm, hnorm, eh_proj,
shared_head.{norm,head}, embed_tokens + block, router bias fp32 as released). MiMo-7B: a Qwen2 trunk whose
config.json says `model_type` "mimo" / `MiMoForCausalLM` (remote code), head under `model.mtp_layers.0.*`.
transformers drops these head tensors on load, so they are written with safetensors directly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from mtptune.families import family_by_name
from mtptune.families.depth_prefixed import DepthPrefixedFamily
from mtptune.families.moe_experts import split_experts
from mtptune.modeling.head import MtpHead


@dataclass(frozen=True)
class TinySpec:
    family: Literal["qwen3_5", "qwen3_5_moe", "qwen3_next", "deepseek_v3", "glm4_moe", "mimo"] = "qwen3_5"
    layout: Literal["conditional", "text"] = "conditional"  # ignored for qwen3_next (always text)
    tied: bool = False
    mtp_experts: Literal["per_expert", "fused"] = "per_expert"
    shards: int = 1
    hidden_size: int = 64
    num_hidden_layers: int = 4
    vocab_size: int = 1000
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    linear_head_dim: int = 16
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    seed: int = 0
    dtype: str = "bfloat16"


def text_kwargs(spec: TinySpec) -> dict:
    kwargs = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        linear_key_head_dim=spec.linear_head_dim,
        linear_value_head_dim=spec.linear_head_dim,
        linear_num_key_heads=spec.linear_num_key_heads,
        linear_num_value_heads=spec.linear_num_value_heads,
        tie_word_embeddings=spec.tied,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        eos_token_id=spec.vocab_size - 1,
    )
    if spec.family != "qwen3_5":
        kwargs.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
        )
    if spec.family == "qwen3_next":
        kwargs.update(decoder_sparse_step=1, layer_types=None, full_attention_interval=4)
    else:
        kwargs.update(mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False)
    return kwargs


def other_family_config(spec: TinySpec) -> PretrainedConfig:
    """Configs of the DeepSeek-style and MiMo tiny trunks (hidden 64, MoE with 4 experts, 1 MTP depth)."""
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        tie_word_embeddings=spec.tied,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        eos_token_id=spec.vocab_size - 1,
        num_nextn_predict_layers=1,
    )
    moe = dict(
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
    )
    if spec.family == "deepseek_v3":  # MLA: low-rank q and compressed kv, decoupled rope dims, interleaved rope
        return DeepseekV3Config(
            **common, **moe, n_group=2, num_key_value_heads=spec.num_attention_heads, q_lora_rank=32,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        )  # fmt: skip
    if spec.family == "glm4_moe":  # GQA with biases, q/k norms, partial rotary 0.5
        return Glm4MoeConfig(
            **common, **moe, n_group=1, num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
            attention_bias=True, use_qk_norm=True,
        )  # fmt: skip
    return Qwen2Config(**common, num_key_value_heads=spec.num_key_value_heads, architectures=["MiMoForCausalLM"])


def build_model(spec: TinySpec) -> torch.nn.Module:
    torch.manual_seed(spec.seed)
    if spec.family in ("deepseek_v3", "glm4_moe", "mimo"):
        classes = {"deepseek_v3": DeepseekV3ForCausalLM, "glm4_moe": Glm4MoeForCausalLM, "mimo": Qwen2ForCausalLM}
        return _perturb_norms(classes[spec.family](other_family_config(spec)), spec)
    text = text_kwargs(spec)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=spec.hidden_size)
    if spec.family == "qwen3_next":
        model = Qwen3NextForCausalLM(Qwen3NextConfig(**text))
    elif spec.family == "qwen3_5":
        if spec.layout == "text":
            model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text))
        else:
            model = Qwen3_5ForConditionalGeneration(
                Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=spec.tied)
            )
    elif spec.layout == "text":
        model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**text))
    else:
        model = Qwen3_5MoeForConditionalGeneration(
            Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec.tied)
        )
    return _perturb_norms(model, spec)


def _perturb_norms(model: torch.nn.Module, spec: TinySpec) -> torch.nn.Module:
    # HF initialises norms to exactly 0 (zero-centred) or 1 (Llama-style); perturb them so tests can tell
    # (1 + w) from w and a swapped norm from the right one.
    centre = 0.0 if family_by_name(spec.family).zero_centered_norms else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(centre, 0.1)
    return model.to(getattr(torch, spec.dtype)).eval()


def random_head_state(spec: TinySpec, text_config) -> dict[str, torch.Tensor]:
    """A randomly initialised native head (in-memory layout), reproducible from spec.seed."""
    family = family_by_name(spec.family)
    torch.manual_seed(spec.seed + 1)
    head = MtpHead(family, text_config)
    centre = 0.0 if family.zero_centered_norms else 1.0
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(centre, 0.1)
            else:
                param.normal_(0.0, 0.05)
        for name, buffer in head.named_buffers():
            if name.rsplit(".", 1)[-1] in family.fp32_buffers:  # e.g. a non-zero fp32 router bias
                buffer.copy_(torch.randn_like(buffer) * 0.01)
    dtype = getattr(torch, spec.dtype)
    return {k: v if k.rsplit(".", 1)[-1] in family.fp32_buffers else v.to(dtype) for k, v in head.state_dict().items()}


def write_tiny_verifier(out_dir: str | Path, spec: TinySpec = TinySpec(), model: torch.nn.Module | None = None) -> Path:
    """Build (or take) a tiny verifier and write it with a native `mtp.*` head in the real on-disk layout."""
    out_dir = Path(out_dir)
    model = model if model is not None else build_model(spec)
    text_config = model.config.get_text_config()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(f))
        head = random_head_state(spec, text_config)
        family = family_by_name(spec.family)
        if isinstance(family, DepthPrefixedFamily):
            tensors.update(_depth_prefixed_head(family, head, tensors, text_config, spec))
        else:
            if spec.mtp_experts == "per_expert":
                head = split_experts(head)
            tensors.update({"mtp." + k: v for k, v in head.items()})
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            if (Path(tmp) / name).exists():
                shutil.copy(Path(tmp) / name, out_dir / name)
    if spec.family == "mimo":  # MiMo-7B's own config: remote-code model_type / architecture, Qwen2 fields
        config = json.loads((out_dir / "config.json").read_text())
        config.update(model_type="mimo", architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors_shards(out_dir, tensors, spec.shards)
    return out_dir


def _depth_prefixed_head(
    family: DepthPrefixedFamily,
    head: dict[str, torch.Tensor],
    trunk: dict[str, torch.Tensor],
    text_config: PretrainedConfig,
    spec: TinySpec,
) -> dict[str, torch.Tensor]:
    """The head under the family's depth-0 prefix, plus DeepSeek's per-layer embed / LM-head copies."""
    prefix = family.native_prefix(text_config)
    keep_fused = (
        set()
        if spec.mtp_experts == "per_expert"
        else {k for k in head if k.endswith(("gate_up_proj", "down_proj")) and ".experts." in k}
    )
    native = family.to_native(head, prefix, keep_fused)
    if "embed_tokens" in family.frozen:
        embed = trunk["model.embed_tokens.weight"]
        native[prefix + "embed_tokens.weight"] = embed.clone()
        native[prefix + "shared_head.head.weight"] = trunk.get("lm_head.weight", embed).clone()
    return native


def write_safetensors_shards(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """HF naming: a single `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus the index."""
    keys = sorted(tensors)
    if shards <= 1:
        save_file({k: tensors[k].contiguous() for k in keys}, out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = keys[i * per : (i + 1) * per]
        save_file({k: tensors[k].contiguous() for k in chunk}, out_dir / name, metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = name
            total += tensors[k].numel() * tensors[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
