"""speculators MTP interchange format (docs/contracts.md) without speculators installed: hand-written folders import
into load_head / stitch, exports follow a8 exactly, and wrong folders fail with a clear message.
(Round trips against the real speculators package live in tests/interop/.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtptune.checkpoint.head_checkpoint import is_head_checkpoint, load_head_checkpoint
from mtptune.checkpoint.safetensors_io import SafetensorsCheckpoint
from mtptune.checkpoint.speculators_format import check_interchange_family, is_speculators_checkpoint
from mtptune.cli.main import main
from mtptune.convert import convert_model
from mtptune.errors import CheckpointError, ConfigError
from mtptune.export import export_checkpoint
from mtptune.modeling.load import load_head
from mtptune.stitch import stitch

from ..conftest import SPECS

# The a8 table written out independently of the implementation: native (verifier) name -> interchange name.
A8_EXACT = {"mtp.fc.weight": "mtp_layers.0.input_proj.weight", "mtp.norm.weight": "mtp_layers.0.final_layernorm.weight"}
A8_PREFIX = [
    ("mtp.pre_fc_norm_hidden.", "mtp_layers.0.hidden_layernorm."),
    ("mtp.pre_fc_norm_embedding.", "mtp_layers.0.token_layernorm."),
    ("mtp.layers.0.", "mtp_layers.0."),
]
QWEN_NAMES = ["qwen3_5-conditional-untied-sharded", "qwen3_5_moe-per_expert-sharded", "qwen3_5_moe-fused-single"]


def a8_name(native: str) -> str:
    if native in A8_EXACT:
        return A8_EXACT[native]
    for src, dst in A8_PREFIX:
        if native.startswith(src):
            return dst + native[len(src) :]
    raise AssertionError(native)


def all_tensors(root: Path) -> dict[str, torch.Tensor]:
    ckpt = SafetensorsCheckpoint.open(root)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def write_speculators_folder(
    out: Path, verifier: Path, head: dict[str, torch.Tensor], steps: int = 2, extra: dict | None = None
) -> Path:
    """A speculators MTP checkpoint as speculators 0.9.0 writes one, by hand: head tensors (mtptune's in-memory
    names, experts fused) renamed per a8, optional frozen copies, config per a8."""
    verifier_config = json.loads((verifier / "config.json").read_text())
    text = verifier_config.get("text_config", verifier_config)
    out.mkdir(parents=True)
    tensors = {a8_name("mtp." + k): v for k, v in head.items()}
    tensors.update(extra or {})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["MTPDraftModel"],
        "auto_map": {"": "config.MTPSpeculatorConfig"},
        "dtype": "bfloat16",
        "num_nextn_predict_layers": 1,
        "speculators_config": {
            "algorithm": "mtp",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "accept_tolerance": 0.0,
                    "proposal_type": "greedy",
                    "speculative_tokens": steps,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": {"architectures": verifier_config["architectures"], "name_or_path": str(verifier)},
        },
        "speculators_model_type": "mtp",
        "speculators_version": "0.9.0",
        "transformer_layer_config": text,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def perturbed_head(verifier: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    _, state = load_head_checkpoint(convert_model(verifier, output_path=tmp_path / "native"))
    torch.manual_seed(1)
    return {k: (v.float() + 0.02 * torch.randn_like(v.float()) + 0.01).to(v.dtype) for k, v in state.items()}


@pytest.mark.parametrize("name", QWEN_NAMES)
def test_hand_written_speculators_folder_imports_and_stitches_like_the_mtptune_format(
    tiny_verifiers, tmp_path, name, caplog
):
    verifier = tiny_verifiers[name]
    head = perturbed_head(verifier, tmp_path)
    hidden = 64
    frozen = {
        "embed_tokens.weight": torch.randn(1000, hidden, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(1000, hidden, dtype=torch.bfloat16),
        "verifier_lm_head.weight": torch.full((1000, hidden), float("nan"), dtype=torch.bfloat16),
    }
    folder = write_speculators_folder(tmp_path / "spec", verifier, head, steps=2, extra=frozen)
    assert is_speculators_checkpoint(folder) and is_head_checkpoint(folder)

    with caplog.at_level(logging.WARNING):
        config, state = load_head_checkpoint(folder)
    assert "ignoring 3 frozen verifier tensor(s)" in caplog.text
    assert config.family == SPECS[name].family and config.num_speculative_steps == 2
    assert config.verifier_name_or_path == str(verifier) and config.dtype == "bfloat16"
    assert state.keys() == head.keys() and all(torch.equal(state[k], head[k]) for k in head)

    # The same head through mtptune's own format: identical stitched output, frozen copies never written.
    mine = export_checkpoint(folder, tmp_path / "mtptune-format", format="mtptune")
    ours = stitch(mine, verifier, output_path=tmp_path / "stitched-mtptune", copy_untouched=True)
    theirs = stitch(folder, verifier, output_path=tmp_path / "stitched-speculators", copy_untouched=True)
    before, a, b = all_tensors(verifier), all_tensors(ours.output), all_tensors(theirs.output)
    assert before.keys() == a.keys() == b.keys()
    for key in before:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(before[key], b[key]) != key.startswith("mtp."), key
    assert theirs.changed == theirs.replaced == sum(k.startswith("mtp.") for k in before)


def test_imported_head_loads_for_training_and_evaluation_with_the_same_outputs(tiny_verifiers, tmp_path):
    verifier = tiny_verifiers["qwen3_5_moe-fused-single"]
    head_state = perturbed_head(verifier, tmp_path)
    folder = write_speculators_folder(tmp_path / "spec", verifier, head_state)
    mine = export_checkpoint(folder, tmp_path / "mine", format="mtptune")
    head_a, config_a, _ = load_head(folder, dtype=torch.float32)  # verifier taken from speculators_config
    head_b, _, _ = load_head(mine, verifier, dtype=torch.float32)
    assert config_a.mtp_input_norm == "post_norm"  # converted, not trained by speculators
    ids = torch.randint(0, 1000, (1, 12))
    hidden = torch.randn(1, 12, 64)
    with torch.no_grad():
        out_a = head_a(ids, hidden, num_steps=2, input_norm="none", hidden_is_pre_norm=False)
        out_b = head_b(ids, hidden, num_steps=2, input_norm="none", hidden_is_pre_norm=False)
    for a, b in zip(out_a, out_b):
        assert torch.equal(head_a.logits(a), head_b.logits(b))


def test_speculators_trained_checkpoint_records_the_pre_norm_input(tiny_verifiers, tmp_path):
    verifier = tiny_verifiers["qwen3_5-conditional-untied-sharded"]
    folder = write_speculators_folder(tmp_path / "0", verifier, perturbed_head(verifier, tmp_path))
    (folder / "training_state.json").write_text('{"epoch": 0, "local_step": 1, "global_step": 1}')
    config, _ = load_head_checkpoint(folder)
    assert config.mtp_input_norm == "none" and config.init == "speculators-trained"


@pytest.mark.parametrize("name", [*QWEN_NAMES, "qwen3_next-per_expert-sharded"])
def test_convert_format_speculators_writes_contract_a8(tiny_verifiers, tmp_path, name):
    verifier = tiny_verifiers[name]
    out = convert_model(verifier, output_path=tmp_path / "spec", num_speculative_steps=4, format="speculators")
    body = json.loads((out / "config.json").read_text())
    assert body["speculators_model_type"] == "mtp" and body["architectures"] == ["MTPDraftModel"]
    assert body["model_type"] == "speculator_model" and body["num_nextn_predict_layers"] == 1
    assert body["speculators_version"] == "0.9.0"
    verifier_config = json.loads((verifier / "config.json").read_text())
    assert body["speculators_config"] == {
        "algorithm": "mtp",
        "default_proposal_method": "greedy",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 4}],
        "verifier": {"architectures": verifier_config["architectures"], "name_or_path": str(verifier)},
    }
    layer = body["transformer_layer_config"]
    text = verifier_config.get("text_config", verifier_config)
    assert layer["model_type"] == text["model_type"] and layer["hidden_size"] == 64
    assert "vocab_size" not in layer or layer["vocab_size"] == 1000  # a diff dict: defaults may be left out
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
    native = {k for k in SafetensorsCheckpoint.open(verifier).keys() if k.startswith("mtp.")}
    fused = {a8_name(k) for k in native if ".experts." not in k}
    assert fused <= keys and all(k.startswith("mtp_layers.0.") for k in keys)
    assert not any("embed_tokens" in k or "lm_head" in k for k in keys)
    if SPECS[name].family != "qwen3_5":  # experts fused in the interchange format, whatever the verifier stores
        assert {"mtp_layers.0.mlp.experts.gate_up_proj", "mtp_layers.0.mlp.experts.down_proj"} <= keys

    # Back into mtptune: the same tensors as mtptune's own convert.
    _, imported = load_head_checkpoint(out)
    _, native_head = load_head_checkpoint(convert_model(verifier, output_path=tmp_path / "mine"))
    assert imported.keys() == native_head.keys()
    assert all(torch.equal(imported[k], native_head[k]) for k in imported)


def test_cli_convert_and_export_speculators(tiny_verifier, tmp_path, capsys):
    assert main(["convert", str(tiny_verifier), "--output-path", str(tmp_path / "a"), "--format", "speculators"]) == 0
    assert is_speculators_checkpoint(tmp_path / "a")
    assert main(["convert", str(tiny_verifier), "--output-path", str(tmp_path / "b")]) == 0
    assert main(["export", str(tmp_path / "b"), "--format", "speculators", "--output-path", str(tmp_path / "c")]) == 0
    assert "wrote speculators head checkpoint" in capsys.readouterr().out
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "c" / "config.json").read_text()
    assert all_tensors(tmp_path / "a").keys() == all_tensors(tmp_path / "c").keys()
    assert main(["stitch", str(tmp_path / "c"), str(tiny_verifier), "--output-path", str(tmp_path / "s")]) == 0
    assert "15 mtp.* tensors (0 changed)" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "b"), "--output-path", str(tmp_path / "c")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_non_head_folder_as_from_pretrained_fails_clearly(tiny_verifier, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(CheckpointError, match="is not a head checkpoint: neither mtptune's"):
        load_head(junk, tiny_verifier)
    with pytest.raises(CheckpointError, match="nor a speculators MTP checkpoint"):
        load_head_checkpoint(junk)


def test_other_speculators_algorithms_and_extra_layers_are_rejected(tiny_verifier, tmp_path):
    eagle = tmp_path / "eagle"
    eagle.mkdir()
    (eagle / "config.json").write_text(json.dumps({"speculators_model_type": "eagle3"}))
    assert not is_speculators_checkpoint(eagle)
    with pytest.raises(CheckpointError, match="imports only MTP heads"):
        load_head_checkpoint(eagle)
    head = perturbed_head(tiny_verifier, tmp_path)
    two = write_speculators_folder(
        tmp_path / "two", tiny_verifier, head, extra={"mtp_layers.1.input_proj.weight": torch.zeros(64, 128)}
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'mtp_layers\.1\.input_proj\.weight'"):
        load_head_checkpoint(two)


def test_interchange_mapping_refuses_non_qwen_families():
    check_interchange_family("qwen3_next")
    with pytest.raises(CheckpointError, match="only carries Qwen-style heads"):
        check_interchange_family("mimo")


def test_unknown_format_is_a_config_error(tiny_verifier, tmp_path):
    with pytest.raises(ConfigError, match="--format 'eagle'"):
        convert_model(tiny_verifier, output_path=tmp_path / "x", format="eagle")
