"""Disk: an online run leaves nothing behind (delete) or exactly one file per sample (cache); a full disk is a
clear error, not a hang or a traceback."""

from __future__ import annotations

import subprocess

import pytest

from mtptune.cli.main import main

from .conftest import NUM_ROWS, records, train_args


def test_cache_run_keeps_exactly_one_file_per_sample(corpus, online_server, tmp_path):
    base, storage = online_server
    cache, save = tmp_path / "cache", tmp_path / "ckpt"
    args = train_args(corpus, save, "--vllm-endpoint", base, "--on-generate", "cache", "--hidden-states-path",
                      str(cache), "--epochs", "2")  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"hs_{i}.safetensors" for i in range(NUM_ROWS))
    assert [p.name for p in storage.iterdir()] == []  # moved, locks removed
    server = records(save, "summary")[0]["server"]
    assert server["generated"] == NUM_ROWS and server["cached"] == NUM_ROWS


def test_delete_run_leaves_zero_files(corpus, online_server, tmp_path):
    base, storage = online_server
    cache, save = tmp_path / "cache", tmp_path / "ckpt"
    args = train_args(corpus, save, "--vllm-endpoint", base, "--hidden-states-path", str(cache), "--epochs", "1")
    assert main(args) == 0
    assert [p.name for d in (storage, cache) if d.exists() for p in d.iterdir()] == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_under_save_path_is_a_clear_error(corpus, tiny_disk, capsys):
    args = train_args(corpus, tiny_disk / "ckpt", "--on-missing", "raise", "--epochs", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert str(tiny_disk / "ckpt") in err
    assert [p for p in (tiny_disk / "ckpt").iterdir() if p.name.startswith(".")] == []  # temp folders cleaned
