"""HiddenStatesClient against the real server: validation path, delete/cache policies, model-id check, retries."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from pathlib import Path

import pytest
import torch

from mtptune.errors import ServerError
from mtptune.openai_http import (
    GaveUp,
    HttpStatusError,
    OpenAIHttpClient,
    RetryPolicy,
    Unavailable,
    normalize_endpoint,
    server_root,
    with_retries,
)
from mtptune.serving.client import HiddenStatesClient
from mtptune.serving.hidden_state_files import HiddenStates, lock_path_for, write_hidden_states_file
from mtptune.serving.server_config import free_port
from mtptune.testing.http_stub import QuietHandler, serving
from mtptune.testing.server_process import running_server

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


class _InFlightTokens(HiddenStatesClient):
    """The real client, counting the tokens of the requests it has open at once."""

    open_tokens = peak_tokens = 0

    async def fetch(self, row_id, token_ids):
        self.open_tokens += len(token_ids)
        self.peak_tokens = max(self.peak_tokens, self.open_tokens)
        try:
            return await super().fetch(row_id, token_ids)
        finally:
            self.open_tokens -= len(token_ids)


def test_tokens_ahead_are_bounded_as_well_as_rows(server) -> None:
    """Long rows would otherwise hold prefetch x their length in memory; a row longer than the bound still goes."""
    base, _ = server
    rows = [(i, [10 + (i + j) % 50 for j in range(n)]) for i, n in enumerate([30, 30, 30, 30, 80, 30, 30, 30])]
    with _InFlightTokens([base + "/v1"], model_id="tiny/verifier", hidden_size=64, concurrency=8) as client:
        results = list(client.iter_fetch(rows, prefetch=8, max_tokens=64))
    assert [row for row, _ in results] == [row for row, _ in rows]
    assert all(isinstance(states, HiddenStates) for _, states in results)
    assert client.peak_tokens <= 80  # two 30-token rows at most, or the 80-token row alone
    with _InFlightTokens([base + "/v1"], model_id="tiny/verifier", hidden_size=64, concurrency=8) as client:
        for _ in client.iter_fetch(rows, prefetch=8):  # rows only: all 8 may be open at once
            time.sleep(0.2)  # a slow consumer, as a training step is
    assert client.peak_tokens > 80


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


def test_files_whose_answer_was_lost_are_found_and_deleted_on_close(tmp_path: Path) -> None:
    """A server that dies after writing a file but before answering: the retry succeeds elsewhere, and close() finds
    the orphan by its token ids and age, leaving other clients' files alone."""
    storage = tmp_path / "hs"
    storage.mkdir()
    calls = itertools.count()

    class DiesBeforeAnswering(QuietHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = torch.tensor(body["prompt"])
            path = storage / f"cmpl-{next(calls)}.safetensors"
            lock_path_for(path).touch()
            write_hidden_states_file(path, torch.randn(len(ids), 1, 8), ids)
            if path.name == "cmpl-0.safetensors":
                self.close_connection = True  # killed: the file is written, the answer naming it never sent
                return
            answer = {
                "choices": [{"prompt_token_ids": body["prompt"]}],
                "kv_transfer_params": {"hidden_states_path": str(path)},
            }
            self.send_body(json.dumps(answer))

    (row, ids), (_, other_ids) = ROWS[:2]
    foreign = storage / "another-client.safetensors"  # same folder, another row: not ours to delete
    write_hidden_states_file(foreign, torch.randn(len(other_ids), 1, 8), torch.tensor(other_ids))
    stale = storage / "yesterday.safetensors"  # the same row, written before this client asked: not its answer
    write_hidden_states_file(stale, torch.randn(len(ids), 1, 8), torch.tensor(ids))
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    with (
        serving(DiesBeforeAnswering) as base,
        HiddenStatesClient([base], hidden_size=8, backoff_base=0.01, max_retries=2) as client,
    ):
        [(_row, states)] = list(client.iter_fetch([(row, ids)]))
        assert isinstance(states, HiddenStates), states
        assert (storage / "cmpl-0.safetensors").exists()  # the orphan, until close
    assert client.stats.retried == 1 and client.stats.reclaimed == 1
    assert files_in(storage) == [foreign, stale]


def test_api_key_is_required_and_sent(tiny_verifier: Path, tmp_path: Path) -> None:
    import httpx

    with running_server(tiny_verifier, tmp_path / "hs", "--api-key", "s3cret") as base:
        assert httpx.post(base + "/v1/completions", json={"prompt": [1], "max_tokens": 1}).status_code == 401
        with HiddenStatesClient([base], api_key="s3cret") as client:
            client.check_model()
            [(_, states)] = list(client.iter_fetch(ROWS[:1]))
        assert isinstance(states, HiddenStates)


# --- the shared HTTP layer (mtptune.openai_http), used by this client and by `regenerate` ----------------------
@pytest.mark.parametrize(
    ("given", "base"),
    [
        # the hidden-state client's cases: a server root means its /v1; no scheme means http
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        ("127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("localhost:8000/v1", "http://localhost:8000/v1"),
        # regenerate's cases: a base URL with a path is used as given (OpenAI's convention for base URLs)
        ("https://gateway.example/openai/v1", "https://gateway.example/openai/v1"),
        ("https://gateway.example/serving/llm/", "https://gateway.example/serving/llm"),
        ("  http://host:8000  ", "http://host:8000/v1"),
    ],
)
def test_normalize_endpoint(given: str, base: str) -> None:
    assert normalize_endpoint(given) == base
    assert server_root(given) == base.removesuffix("/v1")


def test_retry_policy_backoff_is_exponential_capped_and_jittered() -> None:
    plain = RetryPolicy(backoff_base=0.5, backoff_max=3.0, jitter=False)
    assert [plain.delay(k) for k in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = [RetryPolicy(backoff_base=1.0).delay(2) for _ in range(200)]
    assert 1.0 <= min(jittered) < 1.2 and 2.8 < max(jittered) < 3.0  # 2 s x [0.5, 1.5)


def test_with_retries_retries_only_what_another_attempt_may_fix() -> None:
    calls: list[int] = []
    retries: list[tuple[int, float]] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Unavailable("down", 503)
        return "ok"

    policy = RetryPolicy(max_retries=3, backoff_base=0.001, jitter=False)
    assert asyncio.run(with_retries(flaky, policy, lambda exc, n, waited: retries.append((n, waited)))) == "ok"
    assert len(calls) == 3 and [n for n, _ in retries] == [1, 2]

    async def final() -> str:
        calls.append(1)
        raise HttpStatusError("POST", "http://x/v1/completions", 400, "bad prompt")

    calls.clear()
    with pytest.raises(HttpStatusError, match="returned HTTP 400: bad prompt"):
        asyncio.run(with_retries(final, policy))
    assert len(calls) == 1  # a 4xx is not retried

    async def down() -> str:
        calls.append(1)
        raise Unavailable("connection refused")

    calls.clear()
    waiting = RetryPolicy(max_retries=1, backoff_base=0.02, backoff_max=0.02, jitter=False, wait_timeout=0.15)
    with pytest.raises(GaveUp, match=r"connection refused \(after \d+ attempts\)") as info:
        asyncio.run(with_retries(down, waiting))
    assert info.value.attempts == len(calls) > 2 and info.value.waited_s >= 0.15  # waited beyond max_retries


def test_send_classifies_the_real_servers_answers(server) -> None:
    base, _ = server

    async def run() -> tuple[object, ...]:
        http = OpenAIHttpClient(connections=2, timeout=30.0)
        try:
            models = await http.send("GET", base + "/v1/models")
            with pytest.raises(HttpStatusError) as bad:  # a token id outside the vocabulary: final
                await http.send("POST", base + "/v1/completions", {"prompt": [10**6], "max_tokens": 1})
            with pytest.raises(Unavailable) as dead:  # nobody listens: another attempt may find a server
                await http.send("GET", f"http://127.0.0.1:{free_port()}/v1/models")
            return models, bad.value, dead.value
        finally:
            await http.aclose()

    models, bad, dead = asyncio.run(run())
    assert models["data"][0]["id"] == "tiny/verifier"
    assert bad.status == 400 and "out of vocabulary" in str(bad)
    assert dead.status is None and "ConnectError" in str(dead)


def test_an_answer_later_than_the_timeout_says_what_to_change() -> None:
    """A server that is up but answers after the request timeout (a queue too deep for a slow verifier) is retried
    like a dead one, and the error names the two knobs that fix it instead of a bare `ReadTimeout`."""

    class Slow(QuietHandler):
        def do_GET(self) -> None:
            time.sleep(1.0)
            self.send_body('{"data": []}')

    async def run(base: str) -> Unavailable:
        http = OpenAIHttpClient(connections=1, timeout=0.2)
        try:
            with pytest.raises(Unavailable) as late:
                await http.send("GET", base + "/models")
            return late.value
        finally:
            await http.aclose()

    with serving(Slow) as base:
        late = asyncio.run(run(base))
    assert late.status is None and "no answer within 0.2 s (ReadTimeout)" in str(late)
    assert "--concurrency" in str(late) and "--request-timeout" in str(late)
