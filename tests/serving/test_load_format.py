"""`mtptune serve --load-format dummy`: random weights from config.json alone, served over the real protocol."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from mtptune.checkpoint.verifier import build_random_causal_lm
from mtptune.cli.main import main
from mtptune.serving.hidden_state_files import read_hidden_states_file
from mtptune.testing.server_process import running_server

REPO = Path(__file__).resolve().parents[2]
HIDDEN, LAYERS, VOCAB = 128, 8, 4096  # make_fake_verifier.py --tiny


@pytest.fixture(scope="module")
def fake_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The peer benchmark's fake Qwen3.5 ConditionalGeneration folder: config.json plus embed / lm_head / final
    norm / mtp.* shards, and no decoder layers at all (a normal load would fail)."""
    out = tmp_path_factory.mktemp("fake") / "fake-qwen3_5"
    script = REPO / "benchmarks" / "peer" / "make_fake_verifier.py"
    subprocess.run(
        [sys.executable, str(script), str(out), "--tiny", "--device", "cpu"], check=True, capture_output=True
    )
    return out


@pytest.fixture(scope="module")
def dummy_server(fake_verifier: Path, tmp_path_factory: pytest.TempPathFactory):
    storage = tmp_path_factory.mktemp("dummy") / "hidden_states"
    extra = ["--load-format", "dummy", "--device", "cpu", "--dtype", "bfloat16", "--batch-window-ms", "20"]
    with running_server(fake_verifier, storage, *extra) as base:
        yield base, storage


def post_capture(base: str, ids: list[int]) -> dict:
    body = {"prompt": ids, "max_tokens": 1, "return_token_ids": True}
    response = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_random_model_is_built_from_config_alone(tmp_path: Path, tiny_verifier: Path) -> None:
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny_verifier / "config.json").read_text())
    model = build_random_causal_lm(only_config, dtype="auto")
    assert type(model).__name__ == "Qwen3_5ForCausalLM"  # text-only, no vision tower
    assert next(model.parameters()).dtype == torch.bfloat16  # "auto" = the dtype config.json declares
    assert not any(name.startswith(("model.visual", "mtp")) for name, _ in model.named_parameters())
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_dummy_server_serves_hidden_states_over_http(dummy_server, fake_verifier: Path) -> None:
    base, storage = dummy_server
    assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == str(fake_verifier)
    ids = list(range(7, 47))
    payload = post_capture(base, ids)
    path = Path(payload["kv_transfer_params"]["hidden_states_path"])
    assert path.parent == storage.resolve()
    states = read_hidden_states_file(path, ids, 1, HIDDEN).hidden_states  # id N: finite, no zero rows
    assert states.dtype == torch.bfloat16 and states.shape == (len(ids), 1, HIDDEN)
    assert payload["choices"][0]["prompt_token_ids"] == ids
    assert 0 <= payload["choices"][0]["token_ids"][0] < VOCAB


def test_dummy_server_batches_concurrent_requests_like_single_ones(dummy_server) -> None:
    base, _ = dummy_server
    prompts = [list(range(1, 1 + n)) for n in (5, 60, 33, 120, 7, 64)]
    singles = [read_hidden_states_file(post_capture(base, ids)["kv_transfer_params"]["hidden_states_path"],
                                       ids, 1, HIDDEN).hidden_states for ids in prompts]  # fmt: skip

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as http:
            responses = await asyncio.gather(
                *(http.post(base + "/v1/completions", json={"prompt": ids, "max_tokens": 1}) for ids in prompts)
            )
        return [r.json() for r in responses]

    for ids, payload, single in zip(prompts, asyncio.run(all_at_once()), singles):
        batched = read_hidden_states_file(payload["kv_transfer_params"]["hidden_states_path"], ids, 1, HIDDEN)
        torch.testing.assert_close(batched.hidden_states.float(), single.float(), atol=3e-2, rtol=3e-2)


def test_dummy_server_logs_that_weights_are_random(dummy_server) -> None:
    base, storage = dummy_server
    port = base.rsplit(":", 1)[1]
    log = (storage.parent / f"server-{port}.log").read_text()
    assert "RANDOM" in log and "--load-format dummy" in log


def test_load_format_is_passed_to_vllm(tiny_verifier: Path, tmp_path: Path, capsys) -> None:
    code = main(["serve", str(tiny_verifier), "--engine", "vllm", "--load-format", "dummy", "--dry-run"])
    assert code == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert argv[argv.index("--load-format") + 1] == "dummy"


def test_load_format_after_double_dash_reaches_the_builtin_engine(tiny_verifier: Path, capsys) -> None:
    assert main(["serve", str(tiny_verifier), "--engine", "builtin", "--dry-run", "--", "--load-format=dummy"]) == 0
    assert "load_format=dummy" in capsys.readouterr().out


def test_builtin_engine_refuses_other_load_formats(tiny_verifier: Path, capsys) -> None:
    assert main(["serve", str(tiny_verifier), "--engine", "builtin", "--dry-run", "--", "--load-format", "pt"]) == 2
    assert "--load-format 'pt'" in capsys.readouterr().err
