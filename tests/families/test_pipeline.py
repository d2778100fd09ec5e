"""The tutorial pipeline on every non-Qwen family, through the CLI: convert -> hidden states -> train (offline)
-> stitch -> evaluate offline. Proves the family interface carries a head end to end, not just round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mtptune.cli.main import main
from mtptune.testing.learnable import write_hidden_state_files, write_prepared_rows


@pytest.mark.parametrize("name", ["deepseek_v3-sharded", "glm4_moe-sharded", "mimo-single"])
def test_convert_train_stitch_evaluate(family_verifiers, tmp_path, name):
    verifier = family_verifiers[name]
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(12):
        n = int(torch.randint(20, 40, (1,), generator=g))
        ids = torch.randint(1, 900, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * 5 + [1] * (n - 5)})
    prepared = write_prepared_rows(rows, tmp_path / "prepared")
    hidden = write_hidden_state_files(verifier, rows, tmp_path / "hs")

    assert main(["convert", str(verifier), "--output-path", str(tmp_path / "converted")]) == 0
    train = [
        "train", "--verifier-name-or-path", str(verifier), "--data-path", str(prepared),
        "--save-path", str(tmp_path / "ckpt"), "--speculator-type", "mtp", "--num-speculative-steps", "2",
        "--epochs", "1", "--lr", "1e-3", "--total-seq-len", "128", "--on-missing", "raise",
        "--hidden-states-path", str(hidden), "--train-data-ratio", "0.75",
    ]  # fmt: skip
    assert main(train) == 0
    best = tmp_path / "ckpt" / "checkpoint_best"
    assert (best / "model.safetensors").is_file()
    assert main(["stitch", str(best), str(verifier), "--output-path", str(tmp_path / "stitched")]) == 0

    # Only trainable head tensors changed; everything else (trunk, frozen shared_head/embed copies) is identical.
    index = tmp_path / "stitched" / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    changed = []
    for f in files:
        with safe_open(tmp_path / "stitched" / f, "pt") as a, safe_open(verifier / f, "pt") as b:
            changed += [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
    assert changed and all(("mtp" in k) or (".layers.2." in k) for k in changed), changed

    out = tmp_path / "eval"
    code = main(["evaluate", "offline", "--head", str(tmp_path / "stitched"), "--data", str(prepared),
                 "--output", str(out), "--no-plot", "--num-steps", "2"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["rows"] == 12 and result["counts"]["num_steps"] == 2 and result["counts"]["drafts"] > 0
    assert 1.0 <= result["acceptance_length"] <= 3.0
