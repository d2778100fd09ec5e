"""Round trips against the real speculators 0.9.0 package, both directions, on the tiny Qwen families.

mtptune -> speculators: our `convert --format speculators` output loads in speculators' `MTPDraftModel.from_pretrained`
with the same step-0 logits as our head on the same inputs, and speculators' own stitcher accepts it.
speculators -> mtptune: a head speculators converted, and one it trained for a step (saved by its own checkpointer),
imports into mtptune and stitches to exactly what speculators' stitcher writes where that works. Where it does not
(measured faults: convert leaves a NaN `verifier_lm_head.weight` that its stitcher writes into / fails on, and it
splits fused experts the verifier stores fused), mtptune's stitch is still exactly the verifier with new mtp.* values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtptune.checkpoint.head_checkpoint import load_head_checkpoint
from mtptune.checkpoint.safetensors_io import SafetensorsCheckpoint
from mtptune.convert import convert_model
from mtptune.families.moe_experts import fuse_experts
from mtptune.modeling.load import load_head
from mtptune.stitch import stitch
from mtptune.testing.tiny import TinySpec, write_tiny_verifier

from .conftest import run_speculators

pytestmark = pytest.mark.interop

CASES = {
    "dense-single": TinySpec(family="qwen3_5"),
    "moe-per_expert-sharded": TinySpec(family="qwen3_5_moe", shards=2),
    "moe-fused-single": TinySpec(family="qwen3_5_moe", mtp_experts="fused"),
    "next-per_expert-single": TinySpec(family="qwen3_next"),
}
STEPS = 3
T = 16


@pytest.fixture(scope="module")
def interop(tmp_path_factory) -> dict:
    """Build everything once, run every speculators action in one subprocess, return paths and its results."""
    root = tmp_path_factory.mktemp("interop")
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 1000, (1, T)), "hidden_states": torch.randn(1, T, 64)}
    torch.save(inputs, root / "inputs.pt")
    actions, cases = [], {}
    for name, spec in CASES.items():
        d = root / name
        verifier = write_tiny_verifier(d / "verifier", spec)
        ours = convert_model(verifier, output_path=d / "ours-spec", num_speculative_steps=STEPS, format="speculators")
        paths = {
            "verifier": verifier,
            "ours": ours,
            "ours_logits": d / "ours-logits.pt",
            "converted": d / "spec-converted",
            "trained_root": d / "spec-trained",
            "trained": d / "spec-trained" / "0",
            "theirs_stitch_ours": d / "speculators-stitch-of-ours",
            "theirs_stitch_converted": d / "speculators-stitch-of-converted",
            "theirs_stitch_trained": d / "speculators-stitch-of-trained",
        }
        base = len(actions)
        actions += [
            {"op": "forward", "checkpoint": str(ours), "inputs": str(root / "inputs.pt"), "output": str(paths["ours_logits"])},
            {"op": "stitch", "checkpoint": str(ours), "verifier": str(verifier), "output": str(paths["theirs_stitch_ours"])},
            {"op": "convert", "verifier": str(verifier), "output": str(paths["converted"]), "steps": STEPS},
            {"op": "train_step", "checkpoint": str(paths["converted"]), "save_path": str(paths["trained_root"]), "inputs": str(root / "inputs.pt")},
            {"op": "stitch", "checkpoint": str(paths["converted"]), "verifier": str(verifier), "output": str(paths["theirs_stitch_converted"])},
            {"op": "stitch", "checkpoint": str(paths["trained"]), "verifier": str(verifier), "output": str(paths["theirs_stitch_trained"])},
        ]  # fmt: skip
        paths["results"] = range(base, len(actions))
        cases[name] = paths
    results = run_speculators(actions, root)
    for paths in cases.values():
        forward, stitch_ours, conv, train, stitch_conv, stitch_train = (results[i] for i in paths["results"])
        paths.update(
            r_forward=forward,
            r_stitch_ours=stitch_ours,
            r_convert=conv,
            r_train=train,
            r_stitch_converted=stitch_conv,
            r_stitch_trained=stitch_train,
        )
    return {"root": root, "inputs": inputs, "cases": cases}


def tensors(root: Path) -> dict[str, torch.Tensor]:
    ckpt = SafetensorsCheckpoint.open(root)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def assert_stitch_contract(verifier: Path, stitched: Path) -> dict[str, torch.Tensor]:
    """c6: same key set, shapes and dtypes as the verifier; every non-mtp tensor bit-identical."""
    before, after = tensors(verifier), tensors(stitched)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and after[key].shape == value.shape, key
        if not key.startswith("mtp."):
            assert torch.equal(after[key], value), key
    return after


def compare_with_speculators_stitch(case: dict, ours: Path, theirs: Path, result: dict) -> str:
    """Ours equals theirs on every verifier tensor where theirs works; returns which speculators fault showed."""
    verifier = case["verifier"]
    mine = assert_stitch_contract(verifier, ours)
    if not result["ok"]:
        return f"speculators stitch failed: {result['error']}"
    their = tensors(theirs)
    extra = sorted(set(their) - set(mine))
    fused = {k for k in mine if k.startswith("mtp.") and k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    if fused:
        # speculators splits the experts and appends per-expert keys next to the (stale) fused ones.
        refused = fuse_experts({k: their[k] for k in extra if ".experts." in k})
        for key in fused:
            assert torch.equal(mine[key], refused[key]), key
    for key in mine:
        if key not in fused:
            assert torch.equal(mine[key], their[key]), key
    return f"speculators wrote keys absent from the verifier: {extra}" if extra else "identical"


@pytest.mark.parametrize("name", list(CASES))
def test_our_export_loads_in_speculators_with_the_same_step0_logits(interop, name):
    case = interop["cases"][name]
    result = case["r_forward"]
    assert result["ok"], result.get("trace")
    assert result["class"] == "MTPDraftModel" and result["num_speculative_steps"] == STEPS
    assert result["nan_parameters"] == []  # every head tensor found under its interchange name
    theirs = torch.load(case["ours_logits"])
    assert len(theirs) == STEPS
    head, _, _ = load_head(case["ours"], dtype=torch.float32)
    ids, hidden = interop["inputs"]["input_ids"], interop["inputs"]["hidden_states"]
    with torch.no_grad():
        # speculators feeds the hidden state as given: our head with no input norm on the same tensor.
        out = head(ids, hidden, num_steps=1, input_norm="none", hidden_is_pre_norm=False)
        logits = head.logits(out[0])
    valid = T - STEPS - 1  # speculators' common valid length
    assert theirs[0].shape == (1, valid, 1000)
    torch.testing.assert_close(logits[:, :valid].float(), theirs[0], atol=2e-4, rtol=2e-4)
    assert (logits[:, :valid].argmax(-1) == theirs[0].argmax(-1)).all()


@pytest.mark.parametrize("name", list(CASES))
def test_speculators_stitches_our_export(interop, name, tmp_path):
    case = interop["cases"][name]
    ours = stitch(case["ours"], case["verifier"], output_path=tmp_path / "ours")
    assert ours.changed == 0  # the native head, unchanged
    outcome = compare_with_speculators_stitch(case, ours.output, case["theirs_stitch_ours"], case["r_stitch_ours"])
    if CASES[name].mtp_experts == "per_expert" or CASES[name].family == "qwen3_5":
        assert outcome == "identical", outcome


@pytest.mark.parametrize("name", list(CASES))
def test_speculators_converted_head_imports_and_stitches(interop, name, tmp_path, caplog):
    case = interop["cases"][name]
    assert case["r_convert"]["ok"], case["r_convert"].get("trace")
    config, state = load_head_checkpoint(case["converted"])
    assert "verifier_lm_head.weight" in caplog.text  # speculators' spurious copy, ignored
    _, native = load_head_checkpoint(convert_model(case["verifier"], output_path=tmp_path / "native"))
    assert state.keys() == native.keys() and all(torch.equal(state[k], native[k]) for k in state)
    assert config.num_speculative_steps == STEPS and config.mtp_input_norm == "post_norm"
    report = stitch(case["converted"], case["verifier"], output_path=tmp_path / "ours")
    assert report.changed == 0
    outcome = compare_with_speculators_stitch(
        case, report.output, case["theirs_stitch_converted"], case["r_stitch_converted"]
    )
    # The measured fault: speculators stitches its own NaN verifier_lm_head copy (or fails on it when sharded).
    assert "verifier_lm_head" in outcome, outcome


@pytest.mark.parametrize("name", list(CASES))
def test_speculators_trained_head_imports_and_stitches_like_speculators(interop, name, tmp_path):
    case = interop["cases"][name]
    assert case["r_train"]["ok"], case["r_train"].get("trace")
    config, state = load_head_checkpoint(case["trained"])
    assert config.mtp_input_norm == "none" and config.init == "speculators-trained"
    _, native = load_head_checkpoint(convert_model(case["verifier"], output_path=tmp_path / "native"))
    assert any(not torch.equal(state[k], native[k]) for k in state)  # the step changed the head
    head, _, _ = load_head(case["trained"], case["verifier"])  # what --from-pretrained / evaluate do
    assert head.fc.weight.dtype == torch.bfloat16
    report = stitch(case["trained"], case["verifier"], output_path=tmp_path / "ours")
    assert report.changed > 0
    outcome = compare_with_speculators_stitch(
        case, report.output, case["theirs_stitch_trained"], case["r_stitch_trained"]
    )
    if CASES[name].mtp_experts == "per_expert" or CASES[name].family == "qwen3_5":
        assert outcome == "identical", outcome
    else:  # fused on disk: speculators appends per-expert keys; ours keeps the verifier's fused form
        assert "absent from the verifier" in outcome, outcome
