"""Bad input, through the user-facing CLI: each case exits 2 (or warns) with a message naming the culprit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mtptune.cli.main import main
from mtptune.serving.server_config import free_port
from mtptune.testing.tiny import TinySpec, write_tiny_verifier

from .conftest import records, train_args


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1]}
PREPARE_CASES = {
    "malformed_jsonl": ([GOOD, "{not json"], r"bad\.jsonl:2: not valid JSON"),
    "missing_loss_mask": ([{"input_ids": [1, 2, 3]}], r"missing_field"),
    "length_mismatch": ([{"input_ids": [1, 2, 3], "loss_mask": [1, 1]}], r"length_mismatch"),
    "id_over_vocab": ([{"input_ids": [1, 2, 100000], "loss_mask": [1, 1, 1]}], r"id_out_of_range"),
    "empty_dataset": ([], r"bad\.jsonl"),
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_prepare_names_the_bad_row(case, corpus, tmp_path, capsys):
    rows, needle = PREPARE_CASES[case]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    rc = main(["prepare", "--model", str(corpus.verifier), "--data", str(data), "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert __import__("re").search(needle, captured.err + captured.out), captured.err + captured.out


def test_rows_longer_than_total_seq_len_are_truncated_and_counted(corpus, tmp_path, capsys):
    save = tmp_path / "ckpt"
    assert main(train_args(corpus, save, "--on-missing", "raise", "--epochs", "1", "--total-seq-len", "30")) == 0
    summary = records(save, "summary")[0]
    longer = sum(len(r["input_ids"]) > 30 for r in corpus.rows)
    assert summary["truncated_rows"] == longer > 0
    assert f"{longer} rows truncated to --total-seq-len" in capsys.readouterr().out


@pytest.fixture(scope="module")
def other_verifier(tmp_path_factory) -> Path:
    """A verifier with another hidden size (and thus another head)."""
    return write_tiny_verifier(tmp_path_factory.mktemp("other") / "v", TinySpec(hidden_size=32))


@pytest.fixture(scope="module")
def no_mtp_verifier(corpus, tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("nomtp") / "v"
    shutil.copytree(corpus.verifier, out)
    for shard in out.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(shard).items() if not k.startswith("mtp.")}
        save_file(tensors, shard, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        body = json.loads(index.read_text())
        body["weight_map"] = {k: v for k, v in body["weight_map"].items() if not k.startswith("mtp.")}
        index.write_text(json.dumps(body))
    return out


def cli_cases(corpus, tmp_path, other_verifier, no_mtp_verifier) -> dict[str, tuple[list[str], str]]:
    save = tmp_path / "ckpt"
    offline = ("--on-missing", "raise")
    port = free_port()
    head = tmp_path / "head"
    not_a_head = tmp_path / "not_head"
    not_a_head.mkdir()
    (not_a_head / "config.json").write_text('{"model_type": "llama"}')
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    return {
        "verifier_without_mtp": (["convert", str(no_mtp_verifier), "--output-path", str(head)], "mtp"),
        "from_pretrained_not_mtptune": (
            train_args(corpus, save, *offline, "--from-pretrained", str(not_a_head)),
            str(not_a_head),
        ),
        "unreachable_endpoint": (
            train_args(corpus, save, "--vllm-endpoint", f"http://127.0.0.1:{port}/v1", "--server-wait-timeout", "0"),
            f"http://127.0.0.1:{port}/v1",
        ),
        "unwritable_save_path": (train_args(corpus, blocker / "ckpt", *offline), str(blocker / "ckpt")),
        "conflicting_flags": (train_args(corpus, save, *offline, "--on-generate", "cache"), "--on-generate cache"),
        "num_workers_vs_concurrency": (
            train_args(corpus, save, *offline, "--num-workers", "2", "--concurrency", "3"),
            "--num-workers",
        ),
    }


CLI_CASES = [
    "verifier_without_mtp",
    "from_pretrained_not_mtptune",
    "unreachable_endpoint",
    "unwritable_save_path",
    "conflicting_flags",
    "num_workers_vs_concurrency",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_rejects_with_the_culprit_named(case, corpus, tmp_path, other_verifier, no_mtp_verifier, capsys):
    args, needle = cli_cases(corpus, tmp_path, other_verifier, no_mtp_verifier)[case]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_head_of_another_verifier_is_refused_by_train_and_stitch(corpus, other_verifier, tmp_path, capsys):
    head = tmp_path / "head"
    assert main(["convert", str(other_verifier), "--output-path", str(head)]) == 0
    capsys.readouterr()
    assert main(train_args(corpus, tmp_path / "ckpt", "--on-missing", "raise", "--from-pretrained", str(head))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("hidden" in err or str(head) in err), err
    assert main(["stitch", str(head), str(corpus.verifier), "--output-path", str(tmp_path / "stitched")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and (str(head) in err or str(corpus.verifier) in err), err
    assert not (tmp_path / "stitched").exists()


def test_served_model_id_must_match_the_verifier_name(corpus, online_server, tmp_path, capsys):
    base, _ = online_server
    args = train_args(corpus, tmp_path / "ckpt", "--vllm-endpoint", base)
    args[args.index("--verifier-name-or-path") + 1] = str(corpus.verifier) + "/"  # same folder, other string
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "must match" in err and str(corpus.verifier) in err
