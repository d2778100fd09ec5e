"""The real built-in server over HTTP: vLLM layer-id semantics, batching, generation, documented error statuses."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3_5ForConditionalGeneration

from mtptune.serving.hidden_state_files import read_hidden_states_file
from mtptune.testing.server_process import running_server
from mtptune.testing.word_tokenizer import EOS, VOCAB

MAX_MODEL_LEN = 256
N = 4  # tiny verifier's num_hidden_layers
PROMPTS = [[5, 17, 300, 42, 8, 9, 10, 11, 900, 3], [7, 7, 7], list(range(100, 160)), [1, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def server(tiny_verifier: Path, word_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory):
    storage = tmp_path_factory.mktemp("server") / "hidden_states"
    with running_server(
        tiny_verifier,
        storage,
        "--target-layer-ids",
        "1",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--batch-window-ms",
        "20",
        "--tokenizer",
        str(word_tokenizer),
    ) as base:
        yield base, storage


@pytest.fixture(scope="module")
def reference(tiny_verifier: Path) -> Qwen3_5ForConditionalGeneration:
    return Qwen3_5ForConditionalGeneration.from_pretrained(tiny_verifier, dtype=torch.bfloat16).eval()


def capture(base: str, ids: list[int]) -> torch.Tensor:
    body = {"model": None, "prompt": ids, "max_tokens": 1, "return_token_ids": True}
    response = httpx.post(base + "/v1/completions", json={k: v for k, v in body.items() if v is not None}, timeout=60)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["choices"][0]["prompt_token_ids"] == ids
    return read_hidden_states_file(payload["kv_transfer_params"]["hidden_states_path"], ids, 2, 64).hidden_states


def reference_states(model: Qwen3_5ForConditionalGeneration, ids: list[int]) -> dict[str, torch.Tensor]:
    """HF forward; the pre-norm residual is taken from the last decoder layer's output (not the norm's input)."""
    language_model = model.model.language_model
    grabbed: list[torch.Tensor] = []
    hook = language_model.layers[-1].register_forward_hook(
        lambda m, a, out: grabbed.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.inference_mode():
            out = language_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        hook.remove()
    return {"id1": out.hidden_states[1][0], "pre_norm": grabbed[0][0], "post_norm": out.hidden_states[-1][0]}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_health_and_models_report_the_model_string_exactly(server, tiny_verifier: Path) -> None:
    base, _ = server
    assert httpx.get(base + "/health").status_code == 200
    data = httpx.get(base + "/v1/models").json()["data"]
    assert data[0]["id"] == str(tiny_verifier)


def test_capture_file_follows_vllm_layer_ids(server, reference, tiny_verifier: Path) -> None:
    base, storage = server
    ids = PROMPTS[0]
    states = capture(base, ids)
    assert states.dtype == torch.bfloat16 and states.shape == (len(ids), 2, 64)
    ref = reference_states(reference, ids)
    assert rel_err(states[:, 0], ref["id1"]) < 1e-2  # id 1 = residual after one layer
    assert rel_err(states[:, 1], ref["pre_norm"]) < 1e-2  # id N = before the final norm ...
    assert rel_err(states[:, 1], ref["post_norm"]) > 0.3  # ... not HF's post-norm hidden_states[-1]
    raw = load_file(next(storage.glob("*.safetensors")))
    assert raw["token_ids"].dtype == torch.int64


def test_concurrent_requests_batch_and_match_one_by_one(server) -> None:
    base, _ = server
    one_by_one = [capture(base, ids) for ids in PROMPTS]
    before = httpx.get(base + "/metrics").text

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as http:
            responses = await asyncio.gather(
                *(http.post(base + "/v1/completions", json={"prompt": ids, "max_tokens": 1}) for ids in PROMPTS)
            )
        return [r.json() for r in responses]

    payloads = asyncio.run(all_at_once())
    for ids, payload, single in zip(PROMPTS, payloads, one_by_one):
        batched = read_hidden_states_file(payload["kv_transfer_params"]["hidden_states_path"], ids, 2, 64)
        torch.testing.assert_close(batched.hidden_states.float(), single.float(), atol=2e-2, rtol=2e-2)
    after = httpx.get(base + "/metrics").text

    def counter(text: str, name: str) -> int:
        return int(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    batches = counter(after, "mtptune_batches_total") - counter(before, "mtptune_batches_total")
    assert batches < len(PROMPTS), "concurrent requests were not batched"
    # Every request's queue wait and file write were timed (files are written before their lock is released).
    for histogram in ("mtptune_queue_wait_seconds", "mtptune_file_write_seconds"):
        timed = counter(after, histogram + "_count") - counter(before, histogram + "_count")
        assert timed == len(PROMPTS), histogram


def test_greedy_generation_equals_model_generate(server, tiny_verifier: Path, word_tokenizer: Path) -> None:
    base, _ = server
    prompt = [11, 22, 33, 44, 55]
    response = httpx.post(
        base + "/v1/completions",
        json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True},
        timeout=60,
    ).json()
    model = AutoModelForCausalLM.from_pretrained(tiny_verifier, dtype=torch.bfloat16).eval()
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=EOS)[0, 5:]
    got = response["choices"][0]["token_ids"]
    assert got == expected.tolist()[: len(got)] and len(got) >= 1
    assert response["usage"] == {"prompt_tokens": 5, "completion_tokens": len(got), "total_tokens": 5 + len(got)}
    assert response["kv_transfer_params"] is None  # generation writes no hidden-state file
    tokenizer = AutoTokenizer.from_pretrained(word_tokenizer)
    assert response["choices"][0]["text"] == tokenizer.decode(got, skip_special_tokens=True)


def test_concurrent_greedy_generation_is_batched_and_equals_one_by_one(server) -> None:
    """Concurrent generation requests share one left-padded decode; each row equals its unbatched greedy output."""
    base, _ = server
    prompts = [[11, 22, 33, 44, 55], [7, 8], [100, 200, 300, 400, 500, 600, 700, 800], [3, 1, 4, 1, 5, 9, 2]]
    limits = [12, 6, 9, 12]

    def body(ids: list[int], limit: int) -> dict:
        return {"prompt": ids, "max_tokens": limit, "temperature": 0, "return_token_ids": True}

    one_by_one = [
        httpx.post(base + "/v1/completions", json=body(ids, n), timeout=60).json()["choices"][0]
        for ids, n in zip(prompts, limits)
    ]

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as http:
            responses = await asyncio.gather(
                *(http.post(base + "/v1/completions", json=body(ids, n)) for ids, n in zip(prompts, limits))
            )
        return [r.json()["choices"][0] for r in responses]

    for single, batched, limit in zip(one_by_one, asyncio.run(all_at_once()), limits):
        assert batched["token_ids"] == single["token_ids"]  # fp32-exact here; bf16 may differ only at near-ties
        assert batched["finish_reason"] == single["finish_reason"]
        assert 1 <= len(batched["token_ids"]) <= limit


def test_sampling_is_reproducible_with_a_seed(server) -> None:
    base, _ = server
    body = {"prompt": [3, 4, 5], "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7, "return_token_ids": True}
    first, second = (httpx.post(base + "/v1/completions", json=body, timeout=60).json() for _ in range(2))
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]


def test_text_prompt_and_chat_use_the_tokenizer(server) -> None:
    base, _ = server
    text = httpx.post(
        base + "/v1/completions", json={"prompt": "w5 w6 w7", "max_tokens": 1, "return_token_ids": True}
    ).json()
    assert text["choices"][0]["prompt_token_ids"] == [5, 6, 7]
    chat = httpx.post(
        base + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "w9 w8"}],
            "max_tokens": 3,
            "temperature": 0,
            "return_token_ids": True,
        },
        timeout=60,
    ).json()
    assert chat["prompt_token_ids"] == [1, 9, 8, 2, 3]
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= len(chat["choices"][0]["token_ids"]) <= 3


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"prompt": [1, VOCAB], "max_tokens": 1}, 400, "out of vocabulary"),
        ({"prompt": [1, -2], "max_tokens": 1}, 400, "out of vocabulary"),
        ({"prompt": [1, 2.5], "max_tokens": 1}, 400, "Malformed"),
        ({"prompt": [1, True], "max_tokens": 1}, 400, "Malformed"),
        ({"prompt": [], "max_tokens": 1}, 400, "empty"),
        ({"prompt": list(range(MAX_MODEL_LEN)), "max_tokens": 1}, 400, "maximum context length"),
        ({"prompt": [1, 2], "max_tokens": 10**9}, 400, "max_tokens"),
        ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 1}, 400, "prompt"),
        ({"prompt": [1, 2], "max_tokens": 1, "model": "other"}, 404, "does not exist"),
        ({"prompt": [[1], [2]], "max_tokens": 1}, 400, "one prompt"),
        ({"prompt": [1, 2], "max_tokens": 2, "stream": True}, 400, "stream"),
        (
            {"prompt": [1, 2], "max_tokens": 1, "kv_transfer_params": {"hidden_states_path": "/tmp/x.safetensors"}},
            400,
            "refused",
        ),
    ],
)
def test_bad_requests_get_documented_statuses(server, body: dict, status: int, needle: str) -> None:
    base, _ = server
    response = httpx.post(base + "/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_non_json_body_is_400(server) -> None:
    base, _ = server
    response = httpx.post(base + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "Malformed" in response.json()["error"]["message"]


def test_metrics_are_prometheus_text(server) -> None:
    base, _ = server
    text = httpx.get(base + "/metrics").text
    for name in (
        "mtptune_requests_total",
        "mtptune_prompt_tokens_total",
        "mtptune_request_latency_seconds_bucket",
        "mtptune_queue_depth",
        "mtptune_batched_tokens_total",
        "mtptune_padded_tokens_total",
    ):
        assert name in text
