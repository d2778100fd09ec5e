"""`mtptune serve --engine builtin`: batching limits and GPU switches reach the server's settings (dry run)."""

from __future__ import annotations

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


def test_cpu_threads_reach_the_server(tiny_verifier, tmp_path, capsys) -> None:
    base = dry_run(tiny_verifier, tmp_path)
    assert main(base) == 0
    assert "cpu_threads=None," in capsys.readouterr().out  # decided at start: 1 on a GPU, all cores on CPU
    assert main([*base, "--cpu-threads", "2"]) == 0
    assert "cpu_threads=2," in capsys.readouterr().out
