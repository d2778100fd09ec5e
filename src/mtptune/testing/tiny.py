"""Tiny verifiers in the exact on-disk layout of real checkpoints, with a native `mtp.*` head.

Layouts: Qwen3.5 / Qwen3.5-MoE as `*ForConditionalGeneration` (`model.language_model.*`, `model.visual.*`,
top-level `mtp.*`) or text-only `*ForCausalLM`; Qwen3-Next `Qwen3NextForCausalLM`. MTP experts per-expert or
fused on disk; tied or untied embeddings; single file or sharded with `model.safetensors.index.json`.
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
from mtptune.families.moe_experts import split_experts
from mtptune.modeling.head import MtpHead


@dataclass(frozen=True)
class TinySpec:
    family: Literal["qwen3_5", "qwen3_5_moe", "qwen3_next"] = "qwen3_5"
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
        linear_num_key_heads=2,
        linear_num_value_heads=4,
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


def build_model(spec: TinySpec) -> torch.nn.Module:
    torch.manual_seed(spec.seed)
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
    # HF initialises zero-centred norms to exactly 0; perturb them so tests can tell (1 + w) from w.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.1)
    return model.to(getattr(torch, spec.dtype)).eval()


def random_head_state(spec: TinySpec, text_config) -> dict[str, torch.Tensor]:
    """A randomly initialised native head (in-memory layout), reproducible from spec.seed."""
    family = family_by_name(spec.family)
    torch.manual_seed(spec.seed + 1)
    head = MtpHead(family, text_config)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 0.05)
    return {k: v.to(getattr(torch, spec.dtype)) for k, v in head.state_dict().items()}


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
        if spec.mtp_experts == "per_expert":
            head = split_experts(head)
        tensors.update({"mtp." + k: v for k, v in head.items()})
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            if (Path(tmp) / name).exists():
                shutil.copy(Path(tmp) / name, out_dir / name)
    write_safetensors_shards(out_dir, tensors, spec.shards)
    return out_dir


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
