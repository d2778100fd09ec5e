"""regenerate against the real built-in server (`mtptune serve --engine builtin`) on a tiny verifier that carries
SmolLM2's real tokenizer and ChatML template."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mtptune.data.prepare import prepare_dataset
from mtptune.data.regenerate import ChatClient, ClientConfig, SamplingConfig, regenerate
from mtptune.errors import ServerError
from mtptune.serving.server_config import free_port
from mtptune.testing.tiny import TinySpec, write_tiny_verifier


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, smollm2):
    root = write_tiny_verifier(tmp_path_factory.mktemp("chat") / "verifier", TinySpec(layout="text", vocab_size=49152))
    smollm2.save_pretrained(str(root))
    port = free_port()
    cmd = [sys.executable, "-m", "mtptune.cli.main", "serve", str(root), "--engine", "builtin", "--port", str(port)]
    cmd += ["--hidden-states-path", str(tmp_path_factory.mktemp("hs"))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_multi_turn_regeneration_uses_server_ids_feeds_own_answers_and_resumes(chat_server, tmp_path, smollm2):
    url, root = chat_server
    out = tmp_path / "regen.jsonl"
    sampling = SamplingConfig(temperature=0.0, max_tokens=3)
    report = regenerate(["mt_bench"], out, url, sampling=sampling, max_samples=2, concurrency=2)
    assert (report.regenerated, report.rows_written, report.tokenized_locally) == (2, 4, 0)
    rows = read_rows(out)
    by_id = {(r["id"], r["turn"]): r for r in rows}
    first, second = by_id[("mt_bench-81", 0)], by_id[("mt_bench-81", 1)]
    # the prompt ids are the server's rendering of the history, which holds the model's own first answer
    history = second["messages"][:3]
    assert history[1]["role"] == "assistant" and history[1]["content"] == first["messages"][-1]["content"]
    local = smollm2(
        smollm2.apply_chat_template(history, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    n_prompt = second["loss_mask"].count(0)
    assert second["input_ids"][:n_prompt] == local
    assert second["loss_mask"] == [0] * n_prompt + [1] * 3

    again = regenerate(["mt_bench"], out, url, sampling=sampling, max_samples=2)
    assert (again.skipped_existing, again.regenerated) == (2, 0)
    assert len(read_rows(out)) == 4

    prepared = prepare_dataset(str(root), [str(out)], tmp_path / "prepared")
    assert prepared.rows_out == 4 and prepared.supervised_tokens_total == 12


def test_one_row_per_conversation_merges_prefix_stable_turns(chat_server, tmp_path):
    url, _ = chat_server
    out = tmp_path / "conv.jsonl"
    sampling = SamplingConfig(temperature=0.0, max_tokens=2)
    report = regenerate(["mt_bench"], out, url, sampling=sampling, max_samples=1, one_row_per="conversation")
    [row] = read_rows(out)
    assert report.conversations_split == 0 and sum(row["loss_mask"]) == 4
    assert len(row["input_ids"]) == len(row["loss_mask"])


def test_local_tokenization_fallback_matches_the_template(smollm2):
    client = ChatClient(ClientConfig("http://unused/v1"), SamplingConfig(), None, lambda: smollm2)  # type: ignore[arg-type]
    res = client.tokenize_locally(
        [{"role": "user", "content": "Hi"}], {"role": "assistant", "content": "Hello there"}, "stop"
    )
    assert res.tokenized_locally and res.generated_ids == [19556, 665, 2]
    assert res.prompt_ids[-4:] == [1, 520, 9531, 198]


def test_unreachable_endpoint_fails_with_a_server_error(tmp_path):
    with pytest.raises(ServerError, match="ConnectError"):
        regenerate(["mt_bench"], tmp_path / "x.jsonl", f"http://127.0.0.1:{free_port()}", max_retries=1, max_samples=1)


def test_token_id_prompts_go_to_completions_with_the_servers_ids_and_resume(chat_server, tmp_path, smollm2):
    url, root = chat_server
    data = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "a", "prompt_ids": [1, 520, 9531, 198]},
        {"id": "b", "prompt_token_ids": [1, 2, 3], "max_tokens": 2},  # the row's own limit wins
        {"id": "c", "input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 0, 1, 1]},  # prompt = masked-out prefix
        {"id": "d", "prompt": "Hello there"},  # text: chat in auto mode
        {"id": "e", "input_ids": [5, 6]},  # no loss_mask: cannot tell the prompt apart
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "regen.jsonl"
    sampling = SamplingConfig(temperature=0.0, max_tokens=3)
    report = regenerate([str(data)], out, url, sampling=sampling, concurrency=4)
    assert (report.regenerated, report.rows_written, report.tokenized_locally) == (4, 4, 0)
    assert report.skipped == {"token_id_row": 1} and report.settings["completions"] == 3
    by_id = {r["id"]: r for r in read_rows(out)}
    for cid, prompt, n in (("a", [1, 520, 9531, 198], 3), ("b", [1, 2, 3], 2), ("c", [5, 6, 7], 3)):
        row = by_id[cid]
        assert row["input_ids"][: len(prompt)] == prompt and len(row["input_ids"]) == len(prompt) + n
        assert row["loss_mask"] == [0] * len(prompt) + [1] * n and "messages" not in row
    assert by_id["d"]["messages"][0] == {"role": "user", "content": "Hello there"}  # chat path
    assert report.prompt_tokens == 4 + 3 + 3 + by_id["d"]["loss_mask"].count(0)
    assert report.generated_tokens == 3 + 2 + 3 + 3

    # the same greedy continuation as a direct /v1/completions call
    direct = httpx.post(
        url + "/v1/completions",
        json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0, "return_token_ids": True},
    ).json()["choices"][0]["token_ids"]
    assert by_id["b"]["input_ids"][3:] == direct

    again = regenerate([str(data)], out, url, sampling=sampling)
    assert (again.skipped_existing, again.regenerated) == (4, 0)
    prepared = prepare_dataset(str(root), [str(out)], tmp_path / "prepared")
    assert prepared.rows_out == 4


def test_forced_apis_route_text_prompts_to_completions_and_skip_token_rows_in_chat(chat_server, tmp_path, smollm2):
    from mtptune.cli.main import main

    url, _ = chat_server
    data = tmp_path / "prompts.jsonl"
    rows = [{"id": "t", "prompt": "Hello there"}, {"id": "ids", "prompt_ids": [1, 2, 3]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "completions.jsonl"
    argv = ["regenerate", "--data", str(data), "--output", str(out), "--endpoint", url, "--temperature", "0"]
    assert main([*argv, "--max-tokens", "2", "--api", "completions"]) == 0
    by_id = {r["id"]: r for r in read_rows(out)}
    text_prompt = smollm2("Hello there", add_special_tokens=False)["input_ids"]  # tokenized by the server
    assert by_id["t"]["input_ids"][:-2] == text_prompt and by_id["t"]["loss_mask"][-3:] == [0, 1, 1]
    assert "messages" not in by_id["t"]

    chat_only = regenerate([str(data)], tmp_path / "chat.jsonl", url, sampling=SamplingConfig(max_tokens=1), api="chat")
    assert chat_only.skipped == {"token_id_row": 1} and chat_only.regenerated == 1
