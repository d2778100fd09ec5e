"""convert -> stitch round trips on every family/layout, and every bad input with its message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtptune.checkpoint.head_checkpoint import load_head_checkpoint, save_head_checkpoint
from mtptune.checkpoint.safetensors_io import SafetensorsCheckpoint
from mtptune.cli.main import main
from mtptune.convert import convert_model
from mtptune.errors import CheckpointError, ConfigError, FamilyError
from mtptune.stitch import stitch
from mtptune.testing.tiny import TinySpec, write_tiny_verifier

from ..conftest import SPECS


def all_tensors(root: Path) -> dict[str, torch.Tensor]:
    ckpt = SafetensorsCheckpoint.open(root)
    return {k: ckpt.get(k) for k in ckpt.keys()}


@pytest.mark.parametrize("name", list(SPECS))
def test_unchanged_head_round_trips_byte_for_byte(tiny_verifiers, tmp_path, name):
    verifier = tiny_verifiers[name]
    converted = convert_model(verifier, verifier, output_path=tmp_path / "converted", num_speculative_steps=3)
    config, state = load_head_checkpoint(converted)
    assert config.family == SPECS[name].family and config.num_speculative_steps == 3
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    report = stitch(converted, verifier, output_path=tmp_path / "stitched")
    before, after = all_tensors(verifier), all_tensors(report.output)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert report.changed == 0 and report.replaced == sum(k.startswith("mtp.") for k in before)
    assert json.loads((report.output / "config.json").read_text()) == json.loads((verifier / "config.json").read_text())
    if SPECS[name].shards > 1:
        index = report.output / "model.safetensors.index.json"
        assert index.read_text() == (verifier / "model.safetensors.index.json").read_text()
        assert len(report.rewritten_shards) == 1 and len(report.linked_shards) == SPECS[name].shards - 1
        for shard in report.linked_shards:  # untouched shards are hard links, not rewrites
            assert (report.output / shard).stat().st_ino == (verifier / shard).stat().st_ino


@pytest.mark.parametrize(
    "name", ["qwen3_5_moe-per_expert-sharded", "qwen3_5_moe-fused-single", "qwen3_5-text-tied-single"]
)
def test_perturbed_head_changes_exactly_the_mtp_tensors(tiny_verifiers, tmp_path, name):
    verifier = tiny_verifiers[name]
    converted = convert_model(verifier, output_path=tmp_path / "converted")
    config, state = load_head_checkpoint(converted)
    torch.manual_seed(0)
    perturbed = {k: v + 0.01 * torch.randn_like(v.float()).to(v.dtype) + 0.01 for k, v in state.items()}
    save_head_checkpoint(tmp_path / "finetuned", config, perturbed)
    report = stitch(tmp_path / "finetuned", verifier, output_path=tmp_path / "stitched", copy_untouched=True)
    before, after = all_tensors(verifier), all_tensors(report.output)
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == before[key].dtype and after[key].shape == before[key].shape
        assert torch.equal(before[key], after[key]) != key.startswith("mtp."), key
    assert report.changed == report.replaced
    # Experts keep the verifier's own on-disk form.
    fused_on_disk = any(k.endswith("experts.gate_up_proj") for k in before if k.startswith("mtp."))
    assert fused_on_disk == (SPECS[name].mtp_experts == "fused" and SPECS[name].family != "qwen3_5")
    assert not report.linked_shards and len(report.copied_shards) == max(0, SPECS[name].shards - 1)


def test_convert_reads_only_head_tensors(tiny_verifier, tmp_path, monkeypatch):
    read: list[str] = []
    original = SafetensorsCheckpoint.get

    def spy(self, key):
        read.append(key)
        return original(self, key)

    monkeypatch.setattr(SafetensorsCheckpoint, "get", spy)
    convert_model(tiny_verifier, output_path=tmp_path / "c")
    assert read and all(k.startswith("mtp.") for k in read)


def copy_verifier(src: Path, dst: Path, edit) -> Path:
    """A single-file copy of `src` whose tensors are edited by `edit(dict)`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = all_tensors(src)
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_bad_inputs_name_the_culprit(tiny_verifiers, tiny_verifier, tmp_path):
    no_head = copy_verifier(
        tiny_verifier, tmp_path / "nohead", lambda t: [t.pop(k) for k in list(t) if k.startswith("mtp.")]
    )
    with pytest.raises(CheckpointError, match=r"no tensor starts with 'mtp.'"):
        convert_model(no_head, output_path=tmp_path / "o1")

    missing = copy_verifier(tiny_verifier, tmp_path / "missing", lambda t: t.pop("mtp.fc.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 \(e.g. 'mtp.fc.weight'\)"):
        convert_model(missing, output_path=tmp_path / "o2")

    extra = copy_verifier(
        tiny_verifier, tmp_path / "extra", lambda t: t.__setitem__("mtp.bogus.weight", torch.zeros(2))
    )
    with pytest.raises(CheckpointError, match=r"unexpected 1 .*mtp.bogus.weight"):
        convert_model(extra, output_path=tmp_path / "o3")

    def bad_shape(t):
        t["mtp.fc.weight"] = torch.zeros(64, 100, dtype=torch.bfloat16)

    wrong = copy_verifier(tiny_verifier, tmp_path / "shape", bad_shape)
    with pytest.raises(CheckpointError, match=r"'mtp.fc.weight' has shape \(64, 100\)"):
        convert_model(wrong, output_path=tmp_path / "o4")

    small = write_tiny_verifier(tmp_path / "small", TinySpec(hidden_size=32, intermediate_size=64))
    with pytest.raises(CheckpointError, match=r"hidden_size differs"):
        convert_model(tiny_verifier, verifier=small, output_path=tmp_path / "o5")

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(FamilyError, match=r"model_type 'gpt2' has no MTP family.*qwen3_5"):
        convert_model(gpt2, output_path=tmp_path / "o6")

    with pytest.raises(ConfigError, match=r"'eagle3' is not supported"):
        convert_model(tiny_verifier, algorithm="eagle3", output_path=tmp_path / "o7")

    converted = convert_model(tiny_verifier, output_path=tmp_path / "conv")
    with pytest.raises(CheckpointError, match=r"already exists; pass --overwrite"):
        convert_model(tiny_verifier, output_path=converted)

    # Stitch onto a verifier of another family, or one the head does not fit.
    with pytest.raises(CheckpointError, match=r"is a qwen3_5 head but verifier .* is a qwen3_next verifier"):
        stitch(converted, tiny_verifiers["qwen3_next-per_expert-sharded"], output_path=tmp_path / "s1")
    with pytest.raises(CheckpointError, match=r"has hidden_size 64 but verifier .* has 32: this head does not fit"):
        stitch(converted, small, output_path=tmp_path / "s2")
    with pytest.raises(CheckpointError, match=r"is the verifier itself"):
        stitch(converted, tiny_verifier, output_path=tiny_verifier)
    with pytest.raises(CheckpointError, match=r"not an mtptune head checkpoint"):
        stitch(tiny_verifier, tiny_verifier, output_path=tmp_path / "s3")
    with pytest.raises(CheckpointError, match=r"has no mtp.\* tensors"):
        stitch(converted, no_head, output_path=tmp_path / "s4")
    assert not any(p.name.startswith(".s") for p in tmp_path.iterdir())  # no temp folders left behind


def test_failed_verification_leaves_no_output(tiny_verifier, tmp_path, monkeypatch):
    import mtptune.stitch as stitch_module

    converted = convert_model(tiny_verifier, output_path=tmp_path / "conv")

    def broken_verify(*args):
        raise CheckpointError("stitch verification failed: simulated")

    monkeypatch.setattr(stitch_module, "_verify", broken_verify)
    with pytest.raises(CheckpointError, match=r"simulated"):
        stitch(converted, tiny_verifier, output_path=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_cli_convert_and_stitch(tiny_verifier, tmp_path, capsys):
    assert (
        main(["convert", str(tiny_verifier), "--output-path", str(tmp_path / "c"), "--num-speculative-steps", "2"]) == 0
    )
    assert load_head_checkpoint(tmp_path / "c")[0].num_speculative_steps == 2
    assert main(["stitch", str(tmp_path / "c"), str(tiny_verifier), "--output-path", str(tmp_path / "s")]) == 0
    assert "verified" in capsys.readouterr().out
    assert load_file(tmp_path / "c" / "model.safetensors").keys()
    # Errors print one line without a traceback and exit 2.
    assert main(["convert", str(tmp_path / "nowhere"), "--output-path", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "mtptune convert: error:" in err and "nowhere" in err and "Traceback" not in err
    assert (
        main(["convert", str(tiny_verifier), "--algorithm-kwargs", "{bad", "--output-path", str(tmp_path / "y")]) == 2
    )
    assert "--algorithm-kwargs is not valid JSON" in capsys.readouterr().err
