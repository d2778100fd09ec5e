"""`mtptune serve --engine vllm --dry-run` and scripts/launch_vllm.py print the exact `vllm serve` command
(docs/contracts.md, "Launching vLLM")."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mtptune.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_dry_run_prints_the_extraction_command(tiny_verifier: Path, tmp_path: Path, capsys) -> None:
    storage = tmp_path / "hs"
    code = main(
        [
            "serve",
            str(tiny_verifier),
            "--engine",
            "vllm",
            "--hidden-states-path",
            str(storage),
            "--dry-run",
            "--",
            "--port",
            "9000",
            "--gpu-memory-utilization",
            "0.5",
        ]
    )
    assert code == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert argv[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", str(tiny_verifier)]
    spec = json.loads(flag_value(argv, "--speculative-config"))
    assert spec == {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [4]}},  # N of the tiny verifier
    }
    kv = json.loads(flag_value(argv, "--kv-transfer-config"))
    assert kv["kv_connector"] == "ExampleHiddenStatesConnector" and kv["kv_role"] == "kv_producer"
    assert kv["kv_connector_extra_config"] == {"shared_storage_path": str(storage)}
    assert "--no-enable-chunked-prefill" in argv and "--no-enable-prefix-caching" in argv
    assert argv[-4:] == ["--port", "9000", "--gpu-memory-utilization", "0.5"]  # engine args unchanged, last
    assert argv.count("--port") == 1


@pytest.mark.parametrize(
    ("flags", "ids"),
    [(["--target-layer-ids", "2"], [2, 4]), (["--target-layer-ids", "4", "2", "--no-include-last-layer"], [4, 2])],
)
def test_launch_vllm_script_layer_ids(tiny_verifier: Path, flags: list[str], ids: list[int]) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "launch_vllm.py"),
            str(tiny_verifier),
            *flags,
            "--dry-run",
            "--trust-remote-code",
            "--",
            "--port",
            "8001",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    argv = shlex.split(out.strip())
    assert json.loads(flag_value(argv, "--speculative-config"))["draft_model_config"]["hf_config"] == {
        "eagle_aux_hidden_state_layer_ids": ids
    }
    assert "--trust-remote-code" in argv


def test_layer_ids_without_n_are_a_clear_error(tiny_verifier: Path, capsys) -> None:
    """MTP reads layer N: serve refuses a capture list that lacks it (train resolves ids by the same rule)."""
    args = ["serve", str(tiny_verifier), "--engine", "vllm", "--target-layer-ids", "2", "--no-include-last-layer"]
    assert main([*args, "--dry-run"]) == 2
    assert "lacks layer N=4" in capsys.readouterr().err


def test_out_of_range_layer_id_is_a_clear_error(tiny_verifier: Path, capsys) -> None:
    assert main(["serve", str(tiny_verifier), "--engine", "vllm", "--target-layer-ids", "9", "--dry-run"]) == 2
    assert "out of range" in capsys.readouterr().err
