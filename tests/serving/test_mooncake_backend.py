"""`--hidden-states-backend mooncake` (a tutorial flag): vLLM then puts the states into a Mooncake store and answers
with `kv_transfer_params.handle` instead of a file path (docs/contracts.md). mtptune's trainer reads files, so a
server like that stops it at the first row with the fix, the built-in engine refuses the flag, and `serve --engine
vllm` passes it on with a warning."""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtptune.cli.main import main
from mtptune.serving.client import HiddenStatesClient, SystematicFailure
from mtptune.testing.http_stub import QuietHandler, serving


class _MooncakeAnswers(QuietHandler):
    """Answers as vLLM with the Mooncake hidden-states connector does: a handle, no file."""

    requests = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests += 1
        answer = {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": "tiny",
            "choices": [{"index": 0, "text": "", "finish_reason": "length", "prompt_token_ids": body["prompt"]}],
            "kv_transfer_params": {"handle": "hs-cmpl-1"},
        }
        self.send_body(json.dumps(answer))


@pytest.fixture
def mooncake_server() -> Iterator[str]:
    _MooncakeAnswers.requests = 0
    with serving(_MooncakeAnswers) as base:
        yield base


def test_a_mooncake_server_stops_the_trainer_at_the_first_row_with_the_fix(mooncake_server: str) -> None:
    with HiddenStatesClient([mooncake_server], backoff_base=0.01, max_retries=3) as client:
        [(_, result)] = list(client.iter_fetch([(0, [1, 2, 3])]))
    assert isinstance(result, SystematicFailure), result
    assert "Mooncake" in str(result) and "--hidden-states-backend file" in str(result)
    assert _MooncakeAnswers.requests == 1  # not retried: every row would get the same answer


def test_the_builtin_engine_refuses_mooncake(tiny_verifier: Path, capsys) -> None:
    code = main(["serve", str(tiny_verifier), "--engine", "builtin", "--hidden-states-backend", "mooncake"])
    assert code == 2
    assert "the built-in engine writes files" in capsys.readouterr().err


def test_vllm_gets_the_mooncake_connector_and_the_user_a_warning(tiny_verifier: Path, capsys, caplog) -> None:
    args = ["serve", str(tiny_verifier), "--engine", "vllm", "--hidden-states-backend", "mooncake", "--dry-run"]
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "MooncakeHiddenStatesConnector"
    assert "`mtptune train` reads files" in caplog.text
