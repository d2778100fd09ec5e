"""Issue 22's server faults, caused for real against one `mtptune serve` process: a chat template that would loop
for hours, a chunked body over the size limit, a client that abandons a long generation, a request without
max_tokens, and sampling values or save paths that must be refused before the capture file is made."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from mtptune.serving.hidden_state_files import LOCK_SUFFIX, wait_for_writer
from mtptune.testing.server_process import server_process
from mtptune.testing.word_tokenizer import write_word_tokenizer

BODY_LIMIT = 8192  # above the longest save path sent below
JSON_HEADERS = {"content-type": "application/json"}
DEFAULT_MAX_TOKENS = 5
TEMPLATE_TIMEOUT = 3.0  # long enough to see /health answer several times meanwhile
# 10**10 iterations of Jinja: hours of pure Python.
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def without_eos(verifier: Path, out: Path) -> Path:
    """The verifier with no EOS token in its configs: every generation runs to its max_tokens (so lengths are exact
    and a long one is really long), as a base model without an EOS id does."""
    shutil.copytree(verifier, out)

    def drop(node):
        if isinstance(node, dict):
            return {k: (None if k == "eos_token_id" else drop(v)) for k, v in node.items()}
        return node

    for name in ("config.json", "generation_config.json"):
        path = out / name
        if path.exists():
            path.write_text(json.dumps(drop(json.loads(path.read_text())), indent=2))
    return out


@pytest.fixture(scope="module")
def server(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    tokenizer = root / "tokenizer"
    write_word_tokenizer(tokenizer)
    storage = root / "hs"
    (storage / "sub.safetensors").mkdir(parents=True)  # a directory where a custom path could point
    flags = ("--tokenizer", str(tokenizer), "--allow-custom-save-path", "--trust-request-chat-template",
             "--chat-template-timeout", str(TEMPLATE_TIMEOUT), "--max-body-bytes", str(BODY_LIMIT),
             "--default-max-tokens", str(DEFAULT_MAX_TOKENS))  # fmt: skip
    with server_process(without_eos(corpus.verifier, root / "no-eos"), storage, *flags) as proc:
        yield proc, storage


def files(storage: Path) -> set[str]:
    """The storage listing once every write in flight has finished: the server answers a capture before its file is
    complete (vLLM's protocol: the reader waits on the `.lock`), so an earlier request's file may still appear."""
    for lock in storage.glob("*" + LOCK_SUFFIX):
        wait_for_writer(lock.with_suffix(""), lock_timeout=30)
    return {p.name for p in storage.iterdir()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime, stime in clock ticks (USER_HZ = 100 on Linux)


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_slow_chat_template_is_stopped_and_never_blocks_health(server):
    proc, _ = server
    body = {"messages": [{"role": "user", "content": "w1"}], "chat_template": NESTED_LOOPS, "max_tokens": 2}
    answer: dict = {}

    def ask() -> None:
        started = time.monotonic()
        answer["response"] = httpx.post(proc.base + "/v1/chat/completions", json=body, timeout=60)
        answer["done"] = time.monotonic()
        answer["seconds"] = answer["done"] - started

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.5)  # the render is under way
    probes = []  # (seconds taken, when answered)
    while asker.is_alive():
        started = time.monotonic()
        assert httpx.get(proc.base + "/health", timeout=30).status_code == 200
        probes.append((time.monotonic() - started, time.monotonic()))
        time.sleep(0.05)
    asker.join()
    response = answer["response"]
    assert response.status_code == 400, response.text
    assert "did not finish within 3 s" in response.json()["error"]["message"]
    assert TEMPLATE_TIMEOUT <= answer["seconds"] < TEMPLATE_TIMEOUT + 5
    # The event loop stayed free: /health was answered while the render ran (slower, as the render thread shares
    # the GIL and the box may be busy), where a render on the loop would have held every probe until it ended.
    during = [taken for taken, when in probes if when < answer["done"] - 0.2]
    assert len(during) >= 1 and max(during) < TEMPLATE_TIMEOUT, probes
    # The render thread was stopped: the idle server burns no CPU afterwards (the loops would take one core).
    before = cpu_seconds(proc.proc.pid)
    time.sleep(1.5)
    assert cpu_seconds(proc.proc.pid) - before < 0.4


def test_chunked_body_over_the_limit_is_413_and_writes_nothing(server):
    proc, storage = server
    before = files(storage)
    small = json.dumps({"prompt": [5, 6, 7], "max_tokens": 1}).encode()
    big = small[:-1] + b" " * (3 * BODY_LIMIT) + b"}"  # valid JSON, 3x the limit

    def chunked(data: bytes):
        yield from (data[i : i + 1024] for i in range(0, len(data), 1024))

    headers = {"content-type": "application/json"}
    response = httpx.post(proc.base + "/v1/completions", content=chunked(big), headers=headers, timeout=30)
    assert "content-length" not in response.request.headers  # a real chunked upload
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413, response.text
    assert "--max-body-bytes" in response.json()["error"]["message"]
    assert files(storage) == before
    # A chunked body within the limit still works, and so does a declared one over it (413 before reading).
    ok = httpx.post(proc.base + "/v1/completions", content=chunked(small), headers=headers, timeout=30)
    assert ok.status_code == 200, ok.text
    assert httpx.post(proc.base + "/v1/completions", content=big, headers=headers).status_code == 413


def test_abandoned_long_generation_is_cancelled_and_does_not_block_captures(server):
    proc, _ = server
    abandoned = metric(proc.base, "mtptune_abandoned_requests_total")
    body = {"prompt": [5, 6, 7], "max_tokens": 4000, "temperature": 0}  # minutes of decoding on this CPU
    with pytest.raises(httpx.TimeoutException):
        httpx.post(proc.base + "/v1/completions", json=body, timeout=2.0)  # the client gives up after 2 s
    started = time.monotonic()
    capture = httpx.post(proc.base + "/v1/completions", json={"prompt": [8, 9], "max_tokens": 1}, timeout=60)
    assert capture.status_code == 200, capture.text
    assert time.monotonic() - started < 5.0  # not queued behind the rest of the 4000 tokens
    assert metric(proc.base, "mtptune_abandoned_requests_total") == abandoned + 1


def test_omitted_max_tokens_is_capped_by_the_default(server):
    proc, _ = server
    chat = httpx.post(
        proc.base + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "w9 w8"}], "temperature": 0, "return_token_ids": True},
        timeout=60,
    ).json()
    assert len(chat["choices"][0]["token_ids"]) == DEFAULT_MAX_TOKENS  # not max_model_len - prompt
    assert chat["choices"][0]["finish_reason"] == "length"
    null = {"prompt": [3, 4], "max_tokens": None, "temperature": 0, "return_token_ids": True}
    done = httpx.post(proc.base + "/v1/completions", json=null, timeout=60).json()
    assert len(done["choices"][0]["token_ids"]) == DEFAULT_MAX_TOKENS
    omitted = {"prompt": [3, 4], "temperature": 0, "return_token_ids": True}
    done = httpx.post(proc.base + "/v1/completions", json=omitted, timeout=60).json()
    assert len(done["choices"][0]["token_ids"]) == 16  # OpenAI's completions default


BAD_FIELDS = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"temperature": 1e-40}, "temperature"),
    ({"top_p": 1e-300}, "top_p"),
    ({"temperature": 1e400}, "temperature"),  # JSON 1e400 parses as inf
]
BAD_PATHS = [
    ("nul\x00.safetensors", "NUL"),
    ("tab\t.safetensors", "control character"),
    ("x" * 250 + ".safetensors", "name of"),
    ("/".join(["d" * 200] * 21) + ".safetensors", "too long"),
    ("\ud800.safetensors", "encodable"),
    ("sub.safetensors", "directory"),
    ("missing/x.safetensors", "does not exist"),
]


@pytest.mark.parametrize("endpoint", ["capture", "generate"])
def test_unsamplable_values_are_400_before_any_file(server, endpoint):
    proc, storage = server
    max_tokens = 1 if endpoint == "capture" else 2
    for extra, field in BAD_FIELDS:
        before = files(storage)
        body = {"prompt": [5, 6, 7], "max_tokens": max_tokens, **extra}
        response = httpx.post(proc.base + "/v1/completions", content=json.dumps(body), headers=JSON_HEADERS, timeout=30)
        assert response.status_code == 400, (extra, response.text)
        assert field in response.json()["error"]["message"]
        assert files(storage) == before, extra
    # The limits themselves sample fine on both paths (the bounds are where sampling stops working, not beyond).
    for extra in ({"seed": 2**64 - 1}, {"seed": -(2**63)}, {"temperature": 1e-5, "top_p": 1e-5, "seed": 1}):
        body = {"prompt": [5, 6, 7], "max_tokens": max_tokens, **extra}
        assert httpx.post(proc.base + "/v1/completions", json=body, timeout=60).status_code == 200, extra


def test_bad_custom_save_paths_are_400_before_any_file(server):
    proc, storage = server
    for custom, needle in BAD_PATHS:
        before = files(storage)
        body = {"prompt": [5, 6], "max_tokens": 1, "kv_transfer_params": {"hidden_states_path": custom}}
        response = httpx.post(proc.base + "/v1/completions", content=json.dumps(body), headers=JSON_HEADERS, timeout=30)
        assert response.status_code == 400, (custom[:20], response.text)
        error = response.json()["error"]
        assert needle in error["message"] and "hidden_states_path" in error["message"]
        assert files(storage) == before, custom[:20]
    good = {"prompt": [5, 6], "max_tokens": 1, "kv_transfer_params": {"hidden_states_path": "mine.safetensors"}}
    assert httpx.post(proc.base + "/v1/completions", json=good, timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while not (storage / "mine.safetensors").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_concurrent_chat_renders_are_correct(server):
    """Renders run on threads now: concurrent ones must still each get their own prompt."""
    proc, _ = server

    async def chats() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=60) as http:
            bodies = [
                {"messages": [{"role": "user", "content": f"w{i} w{i + 1}"}], "max_tokens": 1, "return_token_ids": True}
                for i in range(10, 26)
            ]
            responses = await asyncio.gather(*(http.post(proc.base + "/v1/chat/completions", json=b) for b in bodies))
        return [r.json()["prompt_token_ids"] for r in responses]

    assert asyncio.run(chats()) == [[1, i, i + 1, 2, 3] for i in range(10, 26)]


def test_rendering_parameters_in_template_kwargs_are_400(server):
    """`chat_template_kwargs` carries template variables; one of the renderer's own parameters (tokenize, return
    tensors, truncation) would change the answer's form and is refused by name."""
    proc, _ = server
    for key, value in (("tokenize", False), ("return_tensors", "pt"), ("add_generation_prompt", False)):
        body = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 1, "chat_template_kwargs": {key: value}}
        response = httpx.post(proc.base + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400, response.text
        assert f"chat_template_kwargs.{key}" in response.json()["error"]["message"]
    variables = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 1, "chat_template_kwargs": {"x": 1}}
    assert httpx.post(proc.base + "/v1/chat/completions", json=variables, timeout=30).status_code == 200
