"""HiddenStatesClient against the real server: validation path, delete/cache policies, model-id check, retries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtptune.errors import ServerError
from mtptune.serving.client import HiddenStatesClient
from mtptune.serving.hidden_state_files import HiddenStates
from tests.serving.conftest import free_port, running_server

ROWS = [(i, [10 + i, 20 + i, 30 + i, 40 + i, 50 + i]) for i in range(6)]


@pytest.fixture(scope="module")
def server(tiny_verifier: Path, tmp_path_factory: pytest.TempPathFactory):
    storage = tmp_path_factory.mktemp("client") / "hidden_states"
    with running_server(tiny_verifier, storage, "--served-model-name", "tiny/verifier") as base:
        yield base, storage


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.exists() else []


def test_delete_policy_leaves_no_files(server) -> None:
    base, storage = server
    with HiddenStatesClient([base + "/v1"], model_id="tiny/verifier", hidden_size=64, concurrency=4) as client:
        assert client.check_model() == "tiny/verifier"
        results = list(client.iter_fetch(ROWS, prefetch=4))
    assert [row for row, _ in results] == [row for row, _ in ROWS]  # input order kept
    for (_row, ids), (_, states) in zip(ROWS, results):
        assert isinstance(states, HiddenStates), states
        assert states.token_ids.tolist() == ids and states.hidden_states.shape == (5, 1, 64)
    assert files_in(storage) == []  # files and their .lock removed
    assert client.stats.succeeded == len(ROWS) and client.stats.failed == 0


def test_cache_policy_keeps_one_file_per_row_and_reuses_it(server, tmp_path: Path) -> None:
    base, storage = server
    cache = tmp_path / "cache"
    with HiddenStatesClient([base], model_id="tiny/verifier", on_generate="cache", cache_dir=cache) as client:
        first = dict(client.iter_fetch(ROWS))
        again = dict(client.iter_fetch(ROWS))
    assert sorted(p.name for p in files_in(cache)) == sorted(f"hs_{row}.safetensors" for row, _ in ROWS)
    assert files_in(storage) == []
    assert client.stats.cache_hits == len(ROWS)
    for row, _ in ROWS:
        assert torch.equal(first[row].hidden_states, again[row].hidden_states)


def test_invalid_cached_file_is_regenerated(server, tmp_path: Path) -> None:
    base, _ = server
    cache = tmp_path / "cache"
    cache.mkdir()
    from safetensors.torch import save_file

    row, ids = ROWS[0]
    save_file({"hidden_states": torch.zeros(5, 1, 64), "token_ids": torch.tensor(ids)}, cache / f"hs_{row}.safetensors")
    with HiddenStatesClient([base], on_generate="cache", cache_dir=cache, hidden_size=64) as client:
        states = dict(client.iter_fetch([(row, ids)]))[row]
    assert isinstance(states, HiddenStates) and states.hidden_states.abs().sum() > 0
    assert client.stats.invalid == {"all_zero": 1} and client.stats.cache_hits == 0


def test_model_id_mismatch_is_an_error(server) -> None:
    base, _ = server
    client = HiddenStatesClient([base], model_id="Qwen/Qwen3.5-9B")
    with pytest.raises(ServerError, match=r"'tiny/verifier'.*'Qwen/Qwen3.5-9B'.*--verifier-name-or-path"):
        client.check_model()


def test_unreachable_endpoint_is_named(tiny_verifier: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerError, match=url.replace(".", r"\.")):
        HiddenStatesClient([url]).check_model()


def test_dead_endpoint_is_retried_on_the_next_one(server) -> None:
    base, _ = server
    dead = f"http://127.0.0.1:{free_port()}"
    with HiddenStatesClient([dead, base], backoff_base=0.01, max_retries=3) as client:
        results = list(client.iter_fetch(ROWS[:2]))
    assert all(isinstance(s, HiddenStates) for _, s in results)
    assert client.stats.retried >= 1 and client.stats.failed == 0


def test_all_dead_fails_loudly_and_counts(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with HiddenStatesClient([dead], backoff_base=0.01, max_retries=2) as client:
        [(_row, result)] = list(client.iter_fetch(ROWS[:1]))
    assert isinstance(result, ServerError) and "3 attempts" in str(result)
    assert client.stats.failed == 1 and client.stats.retried == 2


def test_api_key_is_required_and_sent(tiny_verifier: Path, tmp_path: Path) -> None:
    import httpx

    with running_server(tiny_verifier, tmp_path / "hs", "--api-key", "s3cret") as base:
        assert httpx.post(base + "/v1/completions", json={"prompt": [1], "max_tokens": 1}).status_code == 401
        with HiddenStatesClient([base], api_key="s3cret") as client:
            client.check_model()
            [(_, states)] = list(client.iter_fetch(ROWS[:1]))
        assert isinstance(states, HiddenStates)
