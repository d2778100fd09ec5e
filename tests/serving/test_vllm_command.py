"""`mtptune serve --engine vllm --dry-run` and scripts/launch_vllm.py print the exact `vllm serve` command
(docs/contracts.md, "Launching vLLM")."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtptune.cli.main import main
from mtptune.serving import vllm_command
from mtptune.serving.vllm_command import CPU_KV_CACHE_BYTES, default_kv_cache_bytes, tokenizer_free_flags
from mtptune.testing.tiny import TinySpec, write_tiny_verifier
from mtptune.testing.word_tokenizer import write_word_tokenizer

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


def dry_run(capsys, model: Path, *args: str) -> list[str]:
    assert main(["serve", str(model), "--engine", "vllm", "--dry-run", *args]) == 0
    return shlex.split(capsys.readouterr().out.strip())


def test_relative_storage_path_is_made_absolute(tiny_verifier: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    # vLLM returns `<storage>/<request id>.safetensors` as the file's path: relative to the server's working
    # directory if the storage dir is relative, which the trainer (elsewhere) cannot open.
    monkeypatch.chdir(tmp_path)
    argv = dry_run(capsys, tiny_verifier, "--hidden-states-path", "hs")
    kv = json.loads(flag_value(argv, "--kv-transfer-config"))
    assert kv["kv_connector_extra_config"]["shared_storage_path"] == str(tmp_path.resolve() / "hs")


def test_a_folder_without_tokenizer_is_served_to_token_ids(tiny_verifier: Path, tmp_path: Path, capsys) -> None:
    # mtptune's tiny verifiers have no tokenizer: vLLM cannot start without one unless told to skip it, and the
    # multimodal Qwen3.5 layout (vision_config) then also needs --language-model-only (tests/vllm runs both).
    argv = dry_run(capsys, tiny_verifier, "--", "--port", "9000")
    assert argv[-4:] == ["--skip-tokenizer-init", "--language-model-only", "--port", "9000"]
    text_only = write_tiny_verifier(tmp_path / "text", TinySpec(layout="text"))
    argv = dry_run(capsys, text_only)
    assert "--skip-tokenizer-init" in argv and "--language-model-only" not in argv


@pytest.mark.parametrize(
    ("extra", "absent"),
    [
        (["--tokenizer", "/some/tokenizer"], ["--skip-tokenizer-init", "--language-model-only"]),
        (["--", "--skip-tokenizer-init"], ["--language-model-only"]),
        (["--", "--tokenizer=/some/tokenizer"], ["--skip-tokenizer-init", "--language-model-only"]),
    ],
)
def test_a_named_tokenizer_or_the_users_flag_wins(
    tiny_verifier: Path, capsys, extra: list[str], absent: list[str]
) -> None:
    argv = dry_run(capsys, tiny_verifier, *extra)
    for flag in absent:
        assert flag not in argv
    assert argv.count("--skip-tokenizer-init") <= 1
    if "--tokenizer" in extra:
        assert flag_value(argv, "--tokenizer") == "/some/tokenizer"


def test_a_folder_with_a_tokenizer_or_a_hub_id_gets_no_tokenizer_flags(
    tiny_verifier: Path, tmp_path: Path, capsys
) -> None:
    with_tokenizer = tmp_path / "with-tokenizer"
    shutil.copytree(tiny_verifier, with_tokenizer)
    write_word_tokenizer(with_tokenizer)
    assert tokenizer_free_flags(str(with_tokenizer)) == []
    assert tokenizer_free_flags("Qwen/Qwen3.5-9B") == []
    argv = dry_run(capsys, with_tokenizer)
    assert "--skip-tokenizer-init" not in argv and "--language-model-only" not in argv


def test_allow_custom_save_path_reaches_the_connector(tiny_verifier: Path, capsys) -> None:
    argv = dry_run(capsys, tiny_verifier, "--allow-custom-save-path")
    extra = json.loads(flag_value(argv, "--kv-transfer-config"))["kv_connector_extra_config"]
    assert extra["allow_custom_save_path"] is True
    argv = dry_run(capsys, tiny_verifier)
    assert (
        "allow_custom_save_path"
        not in json.loads(flag_value(argv, "--kv-transfer-config"))["kv_connector_extra_config"]
    )


def test_vllm_cpu_build_gets_a_bounded_kv_cache(tiny_verifier: Path, monkeypatch, capsys) -> None:
    # vLLM's CPU build would size its KV cache to most of the free memory (measured: 16.6 of 18.7 GiB).
    assert default_kv_cache_bytes(cpu_build=True, environ={}) == CPU_KV_CACHE_BYTES
    assert default_kv_cache_bytes(cpu_build=True, environ={"VLLM_CPU_KVCACHE_SPACE": "2"}) is None
    assert default_kv_cache_bytes(cpu_build=False, environ={}) is None
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm_command, "is_vllm_cpu_build", lambda: True)
    assert flag_value(dry_run(capsys, tiny_verifier), "--kv-cache-memory-bytes") == CPU_KV_CACHE_BYTES
    argv = dry_run(capsys, tiny_verifier, "--", "--kv-cache-memory-bytes", "1G")
    assert argv.count("--kv-cache-memory-bytes") == 1 and flag_value(argv, "--kv-cache-memory-bytes") == "1G"
    monkeypatch.setattr(vllm_command, "is_vllm_cpu_build", lambda: False)
    assert "--kv-cache-memory-bytes" not in dry_run(capsys, tiny_verifier)
