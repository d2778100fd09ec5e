"""regenerate against the real built-in server (`mtptune serve --engine builtin`) on a tiny verifier that carries
SmolLM2's real tokenizer and ChatML template."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mtptune.data.prepare import prepare_dataset
from mtptune.data.regenerate import ChatClient, ClientConfig, SamplingConfig, regenerate
from mtptune.errors import ServerError
from mtptune.testing.tiny import TinySpec, write_tiny_verifier


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
