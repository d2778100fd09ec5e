"""On-disk layouts (docs/families.md), convert -> stitch round trips and the one-depth limit of the new families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtptune.checkpoint.head_checkpoint import load_head_checkpoint, save_head_checkpoint
from mtptune.checkpoint.safetensors_io import SafetensorsCheckpoint
from mtptune.checkpoint.verifier import Verifier
from mtptune.convert import convert_model
from mtptune.errors import CheckpointError
from mtptune.stitch import stitch

from .conftest import FAMILY_SPECS

# The fuse-stage names each layout stores (docs/families.md); everything else under the prefix is the decoder block.
FUSE_NAMES = {
    "deepseek_v3": {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"},
    "glm4_moe": {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"},
    "mimo": {"token_layernorm.weight", "hidden_layernorm.weight", "input_proj.weight", "final_layernorm.weight"},
}
FROZEN = {"deepseek_v3": {"shared_head.head.weight", "embed_tokens.weight"}, "mimo": set()}
FROZEN["glm4_moe"] = FROZEN["deepseek_v3"]
PREFIX = {"deepseek_v3": "model.layers.2.", "glm4_moe": "model.layers.2.", "mimo": "model.mtp_layers.0."}
BLOCK = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def all_tensors(root: Path) -> dict[str, torch.Tensor]:
    ckpt = SafetensorsCheckpoint.open(root)
    return {k: ckpt.get(k) for k in ckpt.keys()}


@pytest.mark.parametrize("name", list(FAMILY_SPECS))
def test_native_layout_and_key_classification(family_verifiers, name):
    family_name = FAMILY_SPECS[name].family
    verifier = Verifier.open(str(family_verifiers[name]))
    assert verifier.family.name == family_name
    prefix = PREFIX[family_name]
    head_keys = verifier.head_keys()
    assert head_keys and all(k.startswith(prefix) for k in head_keys)
    # Nothing under the prefix escapes classification, and no trunk layer is taken for the head.
    assert {k for k in verifier.checkpoint.keys() if k.startswith(prefix)} == set(head_keys)
    assert not any(k.startswith("model.layers.1.") for k in head_keys)
    rest = {k[len(prefix) :] for k in head_keys}
    assert FUSE_NAMES[family_name] <= rest and FROZEN[family_name] <= rest
    assert {r.split(".")[0] for r in rest - FUSE_NAMES[family_name] - FROZEN[family_name]} == BLOCK
    assert set(verifier.trainable_head_keys()) == {prefix + r for r in rest - FROZEN[family_name]}
    if verifier.family.fp32_buffers:  # released DeepSeek / GLM store the router bias in fp32
        assert verifier.checkpoint.get(prefix + "mlp.gate.e_score_correction_bias").dtype == torch.float32
    names = verifier.shared_names()
    assert names.embed == "model.embed_tokens.weight" and names.final_norm == "model.norm.weight"
    assert names.lm_head == ("model.embed_tokens.weight" if FAMILY_SPECS[name].tied else "lm_head.weight")


def test_mimo_config_is_remote_code_and_builds_qwen2(family_verifiers):
    root = Path(family_verifiers["mimo-single"])
    body = json.loads((root / "config.json").read_text())
    assert body["model_type"] == "mimo" and body["architectures"] == ["MiMoForCausalLM"]
    verifier = Verifier.open(str(root))
    assert verifier.config.model_type == "qwen2" and verifier.family.num_mtp_layers(verifier.text_config) == 1
    assert verifier.family.concat_order == "hidden_first"


@pytest.mark.parametrize("name", list(FAMILY_SPECS))
def test_unchanged_head_round_trips_byte_for_byte(family_verifiers, tmp_path, name):
    verifier = family_verifiers[name]
    converted = convert_model(verifier, output_path=tmp_path / "converted", num_speculative_steps=2)
    config, state = load_head_checkpoint(converted)
    assert config.family == FAMILY_SPECS[name].family
    assert not any("shared_head.head" in k or "embed_tokens" in k for k in state)  # never part of the head
    report = stitch(converted, verifier, output_path=tmp_path / "stitched")
    before, after = all_tensors(verifier), all_tensors(report.output)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert report.changed == 0
    assert report.replaced == len(Verifier.open(str(verifier)).trainable_head_keys())
    assert (report.output / "config.json").read_text() == (Path(verifier) / "config.json").read_text()


@pytest.mark.parametrize("name", ["deepseek_v3-fused-tied", "glm4_moe-sharded", "mimo-single"])
def test_perturbed_head_changes_exactly_the_trainable_mtp_tensors(family_verifiers, tmp_path, name):
    verifier = family_verifiers[name]
    ver = Verifier.open(str(verifier))
    converted = convert_model(verifier, output_path=tmp_path / "converted")
    config, state = load_head_checkpoint(converted)
    torch.manual_seed(0)
    perturbed = {k: v + 0.01 * torch.randn_like(v.float()).to(v.dtype) + 0.01 for k, v in state.items()}
    save_head_checkpoint(tmp_path / "finetuned", config, perturbed)
    report = stitch(tmp_path / "finetuned", verifier, output_path=tmp_path / "stitched")
    before, after = all_tensors(verifier), all_tensors(report.output)
    trainable = set(ver.trainable_head_keys())
    for key in before:
        assert after[key].dtype == before[key].dtype and after[key].shape == before[key].shape
        assert torch.equal(before[key], after[key]) != (key in trainable), key
    assert report.changed == report.replaced == len(trainable)
    fused_on_disk = any(k.endswith("experts.gate_up_proj") for k in trainable)
    assert fused_on_disk == (FAMILY_SPECS[name].mtp_experts == "fused" and FAMILY_SPECS[name].family != "mimo")


def test_second_depth_is_a_clear_error(family_verifiers, tmp_path):
    """A checkpoint with two MTP depths fails with the reason instead of silently training depth 0 only."""
    root = tmp_path / "two-depths"
    shutil.copytree(family_verifiers["deepseek_v3-fused-tied"], root)
    tensors = load_file(root / "model.safetensors")
    tensors.update(
        {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in tensors.items() if ".layers.2." in k}
    )
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="one MTP depth"):
        convert_model(root, output_path=tmp_path / "converted")
