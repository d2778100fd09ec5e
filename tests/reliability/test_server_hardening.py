"""The built-in server refuses hostile or careless requests with a 4xx/503 and keeps serving: oversized prompts,
bad ids, huge max_tokens, malformed JSON, floods, paths outside its storage, missing API key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from mtptune.cli.main import main
from mtptune.serving.hidden_state_files import HiddenStatesWriteLock, lock_path_for, write_hidden_states_file
from mtptune.serving.protocol import CompletionRequest, Rejected
from mtptune.serving.save_path import custom_save_path
from mtptune.serving.verifier_runtime import sample_token
from mtptune.testing.server_process import running_server

KEY = "s3cret"
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
VOCAB_FOR_FUZZ = 1000
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(corpus, tmp_path_factory):
    storage = tmp_path_factory.mktemp("hardening") / "hs"
    flags = ("--api-key", KEY, "--allow-custom-save-path", "--max-model-len", "64", "--max-queue", "2")
    with running_server(corpus.verifier, storage, *flags) as base:
        yield base, storage


def post(base: str, body, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(base + "/v1/completions", json=body, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"prompt": list(range(1, 80)), "max_tokens": 1}, "maximum context length"),
        ({"prompt": [1, -5, 3], "max_tokens": 1}, "out of vocabulary"),
        ({"prompt": [1, 10**6], "max_tokens": 1}, "out of vocabulary"),
        ({"prompt": [1, 2.5], "max_tokens": 1}, "prompt"),
        ({"prompt": [1, "2"], "max_tokens": 1}, "prompt"),
        ({"prompt": [1, 2], "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": [1, 2], "max_tokens": -1}, "max_tokens"),
        ({"prompt": [1, 2], "max_tokens": 1, "kv_transfer_params": {"hidden_states_path": "../escape.safetensors"}},
         "inside the storage directory"),
        ({"prompt": [1, 2], "max_tokens": 1, "kv_transfer_params": {"hidden_states_path": "/etc/x.safetensors"}},
         "inside the storage directory"),
        ({"prompt": [1, 2], "max_tokens": 1, "kv_transfer_params": {"hidden_states_path": "x.sh"}}, "safetensors"),
    ],
    ids=["oversized", "negative", "over_vocab", "float_id", "string_id", "huge_max_tokens", "negative_max_tokens",
         "path_traversal", "absolute_path", "not_safetensors"],
)  # fmt: skip
def test_bad_requests_are_4xx_with_a_reason(server, body, needle):
    base, storage = server
    response = post(base, body)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]
    assert not (storage.parent / "escape.safetensors").exists()


def test_malformed_json_and_missing_key(server):
    base, _ = server
    bad = httpx.post(base + "/v1/completions", content=b"{nope", headers={**AUTH, "content-type": "application/json"})
    assert bad.status_code == 400
    assert post(base, {"prompt": [1, 2], "max_tokens": 1}, headers={}).status_code == 401
    assert post(base, {"prompt": [1, 2], "max_tokens": 1}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(base + "/health").status_code == 200  # health stays open for probes


def test_flood_is_bounded_by_the_queue_and_the_server_survives(server):
    base, _ = server

    async def flood() -> list[int]:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as http:
            body = {"prompt": list(range(1, 60)), "max_tokens": 1}
            responses = await asyncio.gather(*(http.post(base + "/v1/completions", json=body) for _ in range(40)))
        return [r.status_code for r in responses]

    codes = asyncio.run(flood())
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    assert post(base, {"prompt": [1, 2], "max_tokens": 1}).status_code == 200  # still serving


def test_binds_loopback_by_default(corpus, tmp_path, capsys):
    assert (
        main(["serve", str(corpus.verifier), "--engine", "builtin", "--hidden-states-path", str(tmp_path), "--dry-run"])
        == 0
    )
    assert "host=127.0.0.1" in capsys.readouterr().out


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "n", "stream", "seed", "kv_transfer_params",
                          "model", "stop", "return_token_ids"])  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(FIELDS, JSON, max_size=6))
def test_request_parser_accepts_or_rejects_cleanly(body):
    """Any JSON object either parses to well-typed fields or raises a ValidationError (a 400), nothing else."""
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError:
        return
    prompt = request.prompt
    assert isinstance(prompt, str) or all(
        isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) or isinstance(x, list) for x in prompt
    )
    assert request.max_tokens is None or type(request.max_tokens) is int
    assert (
        request.kv_transfer_params is None
        or request.kv_transfer_params.hidden_states_path is None
        or isinstance(request.kv_transfer_params.hidden_states_path, str)
    )


@pytest.mark.parametrize(
    "extra",
    [{"chat_template": NESTED_LOOPS}, {"chat_template_kwargs": {"chat_template": NESTED_LOOPS}}],
    ids=["top_level", "in_kwargs"],
)
def test_request_chat_template_is_refused_without_consent(server, extra):
    """Issue 22: a template sent with the request is a program; without --trust-request-chat-template it never runs."""
    base, _ = server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}
    started = time.monotonic()
    response = httpx.post(base + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400, response.text
    assert "--trust-request-chat-template" in response.json()["error"]["message"]
    assert time.monotonic() - started < 2.0  # refused, not rendered
    assert httpx.get(base + "/health").status_code == 200


FLOATS = st.floats() | st.floats(min_value=-1e-30, max_value=1e-30) | st.sampled_from([1e-40, 1e-300, 5e-324, 1e-5])
INTS = st.integers(-(2**70), 2**70) | st.sampled_from([2**64, 2**64 - 1, -(2**63), -(2**63) - 1])
SAMPLING = st.fixed_dictionaries(
    {"prompt": st.just([1, 2])},
    optional={"temperature": FLOATS | INTS, "top_p": FLOATS | INTS, "seed": INTS | FLOATS},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SAMPLING)
def test_accepted_sampling_parameters_always_sample(body):
    """Whatever the parser accepts, both of the server's samplers can sample with: the capture path's
    `sample_token` and the generation path's transformers warpers (temperature, top_p, then a seeded draw)."""
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError:
        return
    logits = torch.randn(VOCAB_FOR_FUZZ, generator=torch.Generator().manual_seed(0)) * 30
    token = sample_token(logits, request.temperature, request.top_p, request.seed)
    assert 0 <= token < VOCAB_FOR_FUZZ
    if request.temperature > 0:
        scores = TemperatureLogitsWarper(request.temperature)(None, logits[None].clone())
        scores = TopPLogitsWarper(request.top_p)(None, scores)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        drawn = torch.multinomial(torch.softmax(scores, dim=-1), 1)
        assert 0 <= int(drawn) < VOCAB_FOR_FUZZ


SAVE_PATHS = (
    st.text(max_size=40)
    | st.text(max_size=40).map(lambda t: t + ".safetensors")
    | st.builds(lambda n, k: "/".join(["d" * n] * k) + ".safetensors", st.integers(1, 300), st.integers(1, 25))
    | st.sampled_from(["../x.safetensors", "a/../../x.safetensors", "/etc/x.safetensors", ".safetensors", "sub",
                       "sub/x.safetensors", "sub/../y.safetensors", "\ud800.safetensors", "a\x00.safetensors"])
)  # fmt: skip


@pytest.fixture(scope="module")
def save_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("save_paths").resolve()
    (root / "sub").mkdir()
    return root


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(SAVE_PATHS)
def test_accepted_save_paths_are_writable_and_the_rest_are_400(save_root, custom):
    """A request-chosen path is either refused with a 400 or really writable inside the storage folder: the lock and
    the file are made for it here, as the server's writer makes them."""
    try:
        path = custom_save_path(save_root, custom, allowed=True)
    except Rejected as exc:
        assert exc.status == 400 and "hidden_states_path" in exc.message
        return
    assert path.is_relative_to(save_root) and path.suffix == ".safetensors"
    lock = HiddenStatesWriteLock(path)
    try:
        write_hidden_states_file(path, torch.zeros(2, 1, 4), torch.tensor([1, 2]))
    finally:
        lock.release()
    assert path.is_file()
    path.unlink()
    lock_path_for(path).unlink()
