"""`mtptune serve --engine builtin`: batching limits and GPU switches reach the server's settings (dry run)."""

from __future__ import annotations

import pytest

from mtptune.cli.main import main


def dry_run(verifier, storage) -> list[str]:
    return ["serve", str(verifier), "--engine", "builtin", "--hidden-states-path", str(storage), "--dry-run"]


def test_generation_batch_limits_reach_the_builtin_server(tiny_verifier, tmp_path, capsys) -> None:
    base = dry_run(tiny_verifier, tmp_path)
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "max_generate_batch=32," in out and "max_generate_batch_tokens=65536," in out
    assert (
        main([*base, "--max-generate-batch-tokens", "300000", "--max-queue", "4096", "--", "--max-num-seqs", "512"])
        == 0
    )
    out = capsys.readouterr().out
    assert "max_generate_batch=512," in out and "max_generate_batch_tokens=300000," in out and "max_queue=4096," in out


def test_cudnn_is_off_by_default_and_can_be_turned_on(tiny_verifier, tmp_path, capsys) -> None:
    base = dry_run(tiny_verifier, tmp_path)
    assert main(base) == 0
    assert "cudnn=False," in capsys.readouterr().out
    assert main([*base, "--cudnn"]) == 0
    assert "cudnn=True," in capsys.readouterr().out


def test_kernel_warmup_mode_reaches_the_server(tiny_verifier, tmp_path, capsys) -> None:
    base = dry_run(tiny_verifier, tmp_path)
    for flags, mode in (([], "auto"), (["--no-kernel-warmup"], "never"), (["--kernel-warmup", "always"], "always")):
        assert main([*base, *flags]) == 0
        assert f"kernel_warmup={mode}," in capsys.readouterr().out


def test_cpu_threads_reach_the_server(tiny_verifier, tmp_path, capsys) -> None:
    base = dry_run(tiny_verifier, tmp_path)
    assert main(base) == 0
    assert "cpu_threads=None," in capsys.readouterr().out  # decided at start: 1 on a GPU, all cores on CPU
    assert main([*base, "--cpu-threads", "2"]) == 0
    assert "cpu_threads=2," in capsys.readouterr().out


def test_guard_flags_reach_the_server(tiny_verifier, tmp_path, capsys) -> None:
    base = dry_run(tiny_verifier, tmp_path)
    assert main(base) == 0
    out = capsys.readouterr().out
    for default in ("default_max_tokens=1024,", "max_tokens_limit=4096,", f"max_body_bytes={64 * 1024 * 1024}\n",
                    "trust_request_chat_template=False,", "chat_template_timeout=10.0,"):  # fmt: skip
        assert default in out
    flags = ["--default-max-tokens", "64", "--max-tokens-limit", "128", "--max-body-bytes", "1000",
             "--trust-request-chat-template", "--chat-template-timeout", "2.5"]  # fmt: skip
    assert main([*base, *flags]) == 0
    out = capsys.readouterr().out
    for value in ("default_max_tokens=64,", "max_tokens_limit=128,", "max_body_bytes=1000\n",
                  "trust_request_chat_template=True,", "chat_template_timeout=2.5,"):  # fmt: skip
        assert value in out


@pytest.mark.parametrize(
    "flag, value",
    [("--default-max-tokens", "0"), ("--max-tokens-limit", "-1"), ("--max-body-bytes", "0"),
     ("--chat-template-timeout", "0"), ("--chat-template-timeout", "nan"), ("--max-queue", "0"),
     ("--max-model-len", "-5"), ("--max-batch-rows", "0"), ("--batch-window-ms", "-1"), ("--cpu-threads", "0")],
)  # fmt: skip
def test_out_of_range_numbers_are_usage_errors(tiny_verifier, tmp_path, capsys, flag, value) -> None:
    assert main([*dry_run(tiny_verifier, tmp_path), flag, value]) == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_out_of_range_engine_args_are_config_errors(tiny_verifier, tmp_path, capsys) -> None:
    assert main([*dry_run(tiny_verifier, tmp_path), "--", "--max-model-len", "-5"]) == 2
    assert "must be a positive integer" in capsys.readouterr().err
