"""Checkpoint I/O faults, caused for real: truncated safetensors in every command that reads them, NaN weights,
modes under a set umask, JSON with non-finite values, folders replaced in the safe order, stitch into the
verifier's own folder, and K read from either head format."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtptune.checkpoint import files
from mtptune.checkpoint.files import atomic_folder, json_text
from mtptune.checkpoint.head_checkpoint import load_head_checkpoint, read_head_config, save_head_checkpoint
from mtptune.checkpoint.safetensors_io import INDEX_NAME
from mtptune.cli.main import build_parser, main
from mtptune.cli.train import build_config
from mtptune.errors import CheckpointError
from mtptune.modeling.load import load_head
from mtptune.serving.server_config import free_port
from mtptune.testing.tiny import TinySpec, write_tiny_verifier
from mtptune.training.checkpointing import TrainingState, save_checkpoint
from mtptune.training.loggers import MetricsLogger

from .conftest import CHILD_ENV, train_args


@pytest.fixture(scope="module")
def head(corpus, tmp_path_factory) -> Path:
    """The verifier's native head, converted once (K=2)."""
    out = tmp_path_factory.mktemp("head") / "head"
    assert main(["convert", str(corpus.verifier), "--output-path", str(out), "--num-speculative-steps", "2"]) == 0
    return out


def copy_of(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def truncate(path: Path) -> Path:
    """Cut a file to 60% of its size, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])
    return path


def head_shard(verifier: Path) -> Path:
    weight_map = json.loads((verifier / INDEX_NAME).read_text())["weight_map"]
    return verifier / weight_map["mtp.fc.weight"]


def strict_json(path: Path):
    """json.loads that refuses NaN / Infinity, as every non-Python reader does."""

    def refuse(constant):
        raise ValueError(f"{path}: bare {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# --- truncated safetensors ---------------------------------------------------------------------------------------
def assert_one_line_naming(err: str, culprit: Path) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and str(culprit) in lines[0] and "download" in lines[0], err


def test_truncated_verifier_shard_in_convert(corpus, tmp_path, capsys):
    verifier = copy_of(corpus.verifier, tmp_path / "v")
    shard = truncate(head_shard(verifier))
    assert main(["convert", str(verifier), "--output-path", str(tmp_path / "out")]) == 2
    assert_one_line_naming(capsys.readouterr().err, shard)
    assert not (tmp_path / "out").exists()


def test_truncated_head_or_verifier_in_stitch_and_train(corpus, head, tmp_path, capsys):
    broken_head = copy_of(head, tmp_path / "head")
    weights = truncate(broken_head / "model.safetensors")
    stitch = ["stitch", str(broken_head), str(corpus.verifier), "--output-path", str(tmp_path / "s")]
    assert main(stitch) == 2
    assert_one_line_naming(capsys.readouterr().err, weights)

    verifier = copy_of(corpus.verifier, tmp_path / "v")
    shard = truncate(head_shard(verifier))
    assert main(["stitch", str(head), str(verifier), "--output-path", str(tmp_path / "s")]) == 2
    assert_one_line_naming(capsys.readouterr().err, shard)
    assert not (tmp_path / "s").exists()

    train = train_args(corpus, tmp_path / "ckpt", "--on-missing", "raise", "--from-pretrained", str(broken_head))
    assert main(train) == 2
    assert_one_line_naming(capsys.readouterr().err, weights)


def test_truncated_verifier_shard_in_serve(corpus, tmp_path):
    """A real `mtptune serve` process (were the shard not caught, the server would start: the timeout ends it)."""
    verifier = copy_of(corpus.verifier, tmp_path / "v")
    shard = truncate(verifier / json.loads((verifier / INDEX_NAME).read_text())["weight_map"]["lm_head.weight"])
    serve = ["serve", str(verifier), "--engine", "builtin", "--port", str(free_port())]
    done = subprocess.run(
        [sys.executable, "-m", "mtptune.cli.main", *serve, "--hidden-states-path", str(tmp_path / "hs")],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert_one_line_naming(done.stderr, shard)


# --- NaN weights, one fit check -------------------------------------------------------------------------------------
def test_stitch_refuses_a_nan_weight_naming_the_tensor(corpus, head, tmp_path, capsys):
    config, state = load_head_checkpoint(head)
    state["fc.weight"][0, 0] = float("nan")
    save_head_checkpoint(tmp_path / "nan", config, state)
    assert main(["stitch", str(tmp_path / "nan"), str(corpus.verifier), "--output-path", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "'mtp.fc.weight'" in err and "non-finite" in err and "not written" not in err, err
    assert not (tmp_path / "s").exists()


def test_stitch_checks_the_fit_before_it_says_anything_about_it(corpus, head, tmp_path, capsys, caplog):
    other = write_tiny_verifier(tmp_path / "other", TinySpec(hidden_size=32, intermediate_size=64))
    with caplog.at_level(logging.WARNING):
        assert main(["stitch", str(head), str(other), "--output-path", str(tmp_path / "s")]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert "fits" not in caplog.text  # no "shapes fit" warning before the refusal

    renamed = copy_of(corpus.verifier, tmp_path / "renamed")  # the same verifier under another name: it fits
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["stitch", str(head), str(renamed), "--output-path", str(tmp_path / "s")]) == 0
    assert "which it fits" in caplog.text


# --- stitch inside the verifier folder --------------------------------------------------------------------------
def test_stitch_output_inside_the_verifier_never_copies_itself(corpus, head, tmp_path):
    verifier = copy_of(corpus.verifier, tmp_path / "v")
    original = sorted(p.name for p in verifier.iterdir())
    out = verifier / "stitched"
    assert main(["stitch", str(head), str(verifier), "--output-path", str(out), "--copy"]) == 0
    assert main(["stitch", str(head), str(verifier), "--output-path", str(out), "--copy", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == original  # neither `stitched` nor a temp folder nested
    assert sorted(p.name for p in verifier.iterdir()) == sorted([*original, "stitched"])  # no temp sibling left


# --- modes under the umask ----------------------------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        if not path.is_symlink():
            found[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return found


def test_everything_written_for_others_gets_the_umask(corpus, umask, tmp_path):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    verifier = copy_of(corpus.verifier, tmp_path / "v")
    for shard in verifier.glob("*.safetensors"):
        shard.chmod(0o600)  # a verifier only its owner reads: copies must still get the umask

    def expect_umask(folder: Path) -> None:
        found = modes(folder)
        assert found.pop(".") == dir_mode, folder
        assert found and all(mode == file_mode for mode in found.values()), (
            folder,
            {k: oct(v) for k, v in found.items()},
        )

    converted = tmp_path / "converted"
    assert main(["convert", str(verifier), "--output-path", str(converted)]) == 0
    expect_umask(converted)
    exported = tmp_path / "exported"
    assert main(["export", str(converted), "--output-path", str(exported), "--format", "speculators"]) == 0
    expect_umask(exported)
    copied = tmp_path / "copied"
    assert main(["stitch", str(converted), str(verifier), "--output-path", str(copied), "--copy"]) == 0
    expect_umask(copied)

    linked = tmp_path / "linked"
    assert main(["stitch", str(converted), str(verifier), "--output-path", str(linked)]) == 0
    rewritten = head_shard(linked).name
    assert stat.S_IMODE((linked / rewritten).stat().st_mode) == file_mode
    for shard in verifier.glob("*.safetensors"):  # hard links are the verifier's own files: their mode is untouched
        assert stat.S_IMODE(shard.stat().st_mode) == 0o600
        if shard.name != rewritten:
            assert (linked / shard.name).stat().st_ino == shard.stat().st_ino

    head, config, _ = load_head(converted, verifier, dtype=torch.float32)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = tmp_path / "ckpt" / "0"
    save_checkpoint(checkpoint, config, head, optimizer, scheduler, TrainingState(0, 0, 0), {"tau_sim": 1.0})
    expect_umask(checkpoint)


# --- JSON stays JSON ------------------------------------------------------------------------------------------------
def test_non_finite_values_are_written_as_null(corpus, head, tmp_path):
    head_module, config, _ = load_head(head, corpus.verifier, dtype=torch.float32)
    optimizer = torch.optim.AdamW(head_module.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainingState(1, 0, 4, best_epoch=0, best_tau_sim=float("nan"), best_loss=float("inf"))
    val = {"loss": float("nan"), "tau_sim": float("-inf"), "acc": [0.5, float("nan")]}
    folder = save_checkpoint(tmp_path / "0", config, head_module, optimizer, scheduler, state, val)
    assert strict_json(folder / "val_metrics.json") == {"loss": None, "tau_sim": None, "acc": [0.5, None]}
    written = strict_json(folder / "training_state.json")
    assert written["best_tau_sim"] is None and written["best_loss"] is None and written["global_step"] == 4
    strict_json(folder / "config.json")

    logger = MetricsLogger(tmp_path, (), tmp_path, "run", {})
    logger.log("train", 1, {"loss": float("nan"), "lr": 1e-3})
    logger.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))["loss"] is None
    assert json_text({"x": float("inf")}) == '{\n  "x": null\n}\n'


# --- atomic replacement ---------------------------------------------------------------------------------------------
def test_atomic_folder_keeps_the_old_folder_on_failure_and_replaces_it_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("old")

    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
        raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(CheckpointError, match=r"already exists; pass --overwrite"), atomic_folder(target):
        pass

    seen = []  # what `target` holds at the moment the old copy is deleted
    real_rmtree = shutil.rmtree

    def spy(path, ignore_errors=False):
        seen.append((target / "config.json").read_text())
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(files.shutil, "rmtree", spy)
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert seen == ["new"]  # deleted only after the new folder took its name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("command", ["convert", "export", "stitch"])
def test_every_writer_replaces_its_folder_through_atomic_folder(command, corpus, head, tmp_path, monkeypatch):
    """Overwriting an output deletes the old one only once the new one is in place (the order save_head_checkpoint
    always had; export to speculators and stitch deleted first)."""
    out = tmp_path / "out"
    args = {
        "convert": ["convert", str(corpus.verifier), "--output-path", str(out)],
        "export": ["export", str(head), "--output-path", str(out), "--format", "speculators"],
        "stitch": ["stitch", str(head), str(corpus.verifier), "--output-path", str(out)],
    }[command]
    assert main(args) == 0
    (out / "marker").write_text("old")
    seen = []
    real_rmtree = shutil.rmtree

    def spy(path, ignore_errors=False):
        if Path(path).name.startswith(".out.old-"):
            seen.append(((out / "marker").exists(), (out / "config.json").is_file()))
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(files.shutil, "rmtree", spy)
    assert main([*args, "--overwrite"]) == 0
    assert seen == [(False, True)]


# --- K through the head config ------------------------------------------------------------------------------------
def test_k_comes_from_the_head_config_in_either_format(corpus, head, tmp_path, capsys):
    speculators = tmp_path / "spec"
    assert main(["export", str(head), "--output-path", str(speculators), "--format", "speculators"]) == 0
    assert read_head_config(head).num_speculative_steps == read_head_config(speculators).num_speculative_steps == 2
    for source in (head, speculators):  # before, a speculators folder silently trained K=3
        args = train_args(corpus, tmp_path / "ckpt", "--on-missing", "raise", "--from-pretrained", str(source))
        args = build_parser().parse_args(args)
        assert build_config(args).num_speculative_steps == 2

    body = json.loads((head / "config.json").read_text())
    del body["num_speculative_steps"]
    no_k = copy_of(head, tmp_path / "no_k")
    (no_k / "config.json").write_text(json.dumps(body))
    assert main(train_args(corpus, tmp_path / "ckpt", "--on-missing", "raise", "--from-pretrained", str(no_k))) == 2
    err = capsys.readouterr().err
    assert "lacks 'num_speculative_steps'" in err and str(no_k) in err and "Traceback" not in err
