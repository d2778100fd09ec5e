"""The `.lock` protocol and the client-side validation on real files (docs/contracts.md, "The lock protocol",
"Validating a file")."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtptune.serving import hidden_state_files
from mtptune.serving.hidden_state_files import (
    HiddenStatesInvalid,
    HiddenStatesWriteLock,
    read_hidden_states_file,
    write_hidden_states_file,
)

IDS = [5, 6, 7, 8]


def good_states() -> torch.Tensor:
    return torch.randn(len(IDS), 1, 8).to(torch.bfloat16)


def test_reader_waits_for_the_writer_lock(tmp_path: Path) -> None:
    path = tmp_path / "req.safetensors"
    lock = HiddenStatesWriteLock(path)
    states = good_states()

    def late_write() -> None:
        time.sleep(0.3)
        write_hidden_states_file(path, states, torch.tensor(IDS))
        lock.release()

    threading.Thread(target=late_write).start()
    start = time.monotonic()
    got = read_hidden_states_file(path, IDS, 1, 8, lock_timeout=5.0)
    assert time.monotonic() - start >= 0.25
    assert torch.equal(got.hidden_states, states) and got.token_ids.dtype == torch.int64


def test_reader_polls_a_held_lock_from_1_ms_up_to_100_ms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server answers before its file is written and finishes it a few ms later: the reader polls again after
    1, 2, 4, ... ms (at most 100 ms apart), not at a fixed 100 ms."""
    path = tmp_path / "req.safetensors"
    lock = HiddenStatesWriteLock(path)
    pauses: list[float] = []

    def sleep(seconds: float) -> None:  # the writer finishes during the reader's 9th pause
        pauses.append(seconds)
        if len(pauses) == 9:
            write_hidden_states_file(path, good_states(), torch.tensor(IDS))
            lock.release()

    monkeypatch.setattr(hidden_state_files.time, "sleep", sleep)
    read_hidden_states_file(path, IDS, 1, 8, lock_timeout=60.0)
    assert pauses == [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.1, 0.1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_hand_written_file_is_standard_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "req.safetensors"
    states = torch.randn(7, 2, 12).to(dtype)
    write_hidden_states_file(path, states[1:], torch.arange(6, dtype=torch.int32))  # a view, non-int64 ids
    loaded = load_file(path)
    assert torch.equal(loaded["hidden_states"], states[1:]) and loaded["hidden_states"].dtype == dtype
    assert torch.equal(loaded["token_ids"], torch.arange(6)) and loaded["token_ids"].dtype == torch.int64
    with safe_open(path, "pt") as f:  # the reference reader parses the header as its own files'
        assert sorted(f.keys()) == ["hidden_states", "token_ids"]
    assert not list(tmp_path.glob("*.partial"))


def test_reader_gives_up_on_a_held_lock(tmp_path: Path) -> None:
    path = tmp_path / "req.safetensors"
    lock = HiddenStatesWriteLock(path)
    try:
        with pytest.raises(HiddenStatesInvalid) as info:
            read_hidden_states_file(path, IDS, 1, 8, lock_timeout=0.3)
        assert info.value.reason == "unreadable"
    finally:
        lock.release()


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"hidden_states": torch.zeros(4, 1, 8, dtype=torch.bfloat16), "token_ids": torch.tensor(IDS)}, "all_zero"),
        ({"hidden_states": torch.full((4, 1, 8), float("nan")), "token_ids": torch.tensor(IDS)}, "non_finite"),
        ({"hidden_states": torch.randn(4, 1, 8), "token_ids": torch.tensor([5, 6, 7, 9])}, "token_mismatch"),
        ({"hidden_states": torch.randn(4, 2, 8), "token_ids": torch.tensor(IDS)}, "shape"),
        ({"hidden_states": torch.randn(4, 1, 16), "token_ids": torch.tensor(IDS)}, "shape"),
        ({"token_ids": torch.tensor(IDS)}, "missing_key"),
    ],
)
def test_validation_rejects_bad_files(tmp_path: Path, tensors: dict, reason: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    with pytest.raises(HiddenStatesInvalid) as info:
        read_hidden_states_file(path, IDS, 1, 8)
    assert info.value.reason == reason


def test_one_zero_row_is_rejected(tmp_path: Path) -> None:
    states = good_states()
    states[2] = 0
    path = tmp_path / "row.safetensors"
    write_hidden_states_file(path, states, torch.tensor(IDS))
    with pytest.raises(HiddenStatesInvalid, match="1 of 4 rows"):
        read_hidden_states_file(path, IDS, 1, 8)


def test_garbage_file_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(HiddenStatesInvalid) as info:
        read_hidden_states_file(path, None, None, None)
    assert info.value.reason == "unreadable"


def test_abandoned_locks_and_partials_are_removed_but_live_and_complete_files_kept(tmp_path):
    import fcntl
    import os

    from mtptune.serving.hidden_state_files import (
        HiddenStatesWriteLock,
        lock_path_for,
        remove_abandoned_writes,
        write_hidden_states_file,
    )

    # A killed writer: lock file (nobody holds it) + half-written partial, no data file.
    dead = tmp_path / "dead.safetensors"
    lock_path_for(dead).touch()
    (tmp_path / "dead.safetensors.partial").write_bytes(b"half")
    # A stray partial without a lock.
    (tmp_path / "stray.safetensors.partial").write_bytes(b"x")
    # A live writer still holding its lock.
    live = HiddenStatesWriteLock(tmp_path / "live.safetensors")
    # A completed file a client has not read yet.
    done = tmp_path / "done.safetensors"
    write_hidden_states_file(done, torch.zeros(2, 1, 4), torch.tensor([1, 2]))
    lock_path_for(done).touch()

    assert remove_abandoned_writes(tmp_path) == 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["done.safetensors", "done.safetensors.lock", "live.safetensors.lock"]
    live.release()
    fd = os.open(lock_path_for(tmp_path / "live.safetensors"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: now abandoned
    os.close(fd)
    assert remove_abandoned_writes(tmp_path) == 1
