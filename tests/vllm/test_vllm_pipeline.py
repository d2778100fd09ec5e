"""The tutorial's path with a real vLLM (CPU build) in the loop, on a tiny hybrid Qwen3.5 (issue 23 part A).

1. `mtptune serve --engine vllm` starts vLLM's hidden-state extraction server; the states it returns for a row
   equal the built-in server's (layer N, before the final norm, within bf16 rounding), and `mtptune train
   --on-missing generate --on-generate delete` trains against it, leaving no file behind.
2. The stitched head is served by vLLM with `method: mtp` (the command `mtptune evaluate vllm --serve-command`
   prints); `mtptune evaluate vllm --endpoint` reads its live /metrics, and its acceptance length agrees with
   `mtptune evaluate generate` on the same prompts and K, far above the untrained head's.

Three vLLM starts (1-4 min each on a 2-core box) plus CPU training: ~10-15 min in all (`make test-vllm`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtptune.serving.server_config import free_port
from mtptune.testing.vllm_cpu import Example, write_example
from tests.vllm.conftest import FAST_START, SMALL_KV_CACHE, VLLM_PYTHON, run_mtptune, vllm_server

pytestmark = pytest.mark.vllm

K = 3
MAX_TOKENS = 32
NUM_LAYERS = 4  # N: vLLM's layer id of the last decoder layer's output, before the final norm


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Example:
    return write_example(
        tmp_path_factory.mktemp("vllm") / "example", train_rows=96, test_prompts=8, max_tokens=MAX_TOKENS
    )


@dataclass
class ExtractionRun:
    row: list[int]
    vllm_states: torch.Tensor  # [T, 1, H] as vLLM wrote them, read through mtptune's client
    files_after_fetch: list[str]
    train_stdout: str
    files_after_train: list[str]
    checkpoints: Path


def files_in(storage: Path) -> list[str]:
    return sorted(p.name for p in storage.iterdir()) if storage.exists() else []


@pytest.fixture(scope="module")
def extraction(example: Example) -> ExtractionRun:
    """vLLM as the hidden-state server: one row fetched by the client, then a whole training run; server stopped."""
    from mtptune.serving.client import HiddenStatesClient

    root = example.root
    storage = root / "server_hidden_states"
    port = free_port()
    serve = [VLLM_PYTHON, "-m", "mtptune.cli.main", "serve", example.verifier, "--engine", "vllm"]
    serve += ["--port", port, "--hidden-states-path", storage, "--", *FAST_START]
    row = [1, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]  # stride 1 from 2
    with vllm_server(serve, port, root / "vllm_extraction.log") as base:
        with HiddenStatesClient([base], str(example.verifier), num_layers=1, hidden_size=128) as client:
            (_, states), *_ = list(client.iter_fetch([(0, row)]))
        assert not isinstance(states, Exception), states
        assert states.token_ids.tolist() == row
        after_fetch = files_in(storage)
        run_mtptune(
            "prepare", "--model", example.verifier, "--data", example.train_rows, "--output", "prepared", cwd=root
        )
        train = run_mtptune(
            "train",
            "--verifier-name-or-path", example.verifier,
            "--data-path", "prepared",
            "--vllm-endpoint", base + "/v1",
            "--save-path", "checkpoints",
            "--speculator-type", "mtp",
            "--num-speculative-steps", K,
            "--target-layer-ids", NUM_LAYERS,
            "--step-weight-beta", "0.6",
            "--epochs", "4",
            "--lr", "0.003",
            "--total-seq-len", "256",
            "--on-missing", "generate",
            "--on-generate", "delete",
            cwd=root,
        )  # fmt: skip
        after_train = files_in(storage)
    (root / "train.log").write_text(train.stdout + "\n--- stderr ---\n" + train.stderr)
    return ExtractionRun(row, states.hidden_states, after_fetch, train.stdout, after_train, root / "checkpoints")


def test_vllm_hidden_states_equal_the_builtin_servers(extraction: ExtractionRun, example: Example) -> None:
    from mtptune.modeling.norms import rms_norm
    from mtptune.serving.verifier_runtime import VerifierRuntime

    runtime = VerifierRuntime.load(str(example.verifier), layer_ids=[NUM_LAYERS], device="cpu")
    builtin = runtime.capture([extraction.row])[0].hidden_states.float().reshape(len(extraction.row), -1)
    got = extraction.vllm_states.float().reshape(len(extraction.row), -1)
    assert got.shape == builtin.shape == (len(extraction.row), 128)
    scale = builtin.abs().max()
    assert scale > 1.0  # a trained trunk's residual, not a near-zero tensor that any two agree on
    # bf16: both round each layer's output to 8 significant bits
    assert (got - builtin).abs().max() <= 0.02 * scale, (got - builtin).abs().max()
    assert ((got - builtin).norm(dim=-1) / builtin.norm(dim=-1)).max() <= 0.01
    # ... and it is the residual before the final norm: the normed state is far from it
    # (the trunk learned residuals of RMS ~1, so the norm moves them less than usual; measured: 0.26 on average)
    weight = runtime.model.get_decoder().norm.weight.detach().float()
    normed = rms_norm(builtin, weight, 1e-6, zero_centered=True)  # Qwen3.5's (1 + w) final norm
    assert ((got - normed).norm(dim=-1) / normed.norm(dim=-1)).mean() > 0.1


def test_train_against_vllm_leaves_no_file_behind(extraction: ExtractionRun) -> None:
    assert extraction.files_after_fetch == []  # the client deleted the row's file and its lock
    out = extraction.train_stdout
    summary = re.search(r"hidden states: (\d+) loaded, (\d+) invalid, (\d+) missing, (\d+) failed.*", out)
    assert summary is not None, out[-2000:]
    # A file the client gave up on (its lock held past the client's lock timeout, then retried) is written by
    # vLLM afterwards and stays: the summary's retries say how many requests that could be.
    assert extraction.files_after_train == [], (
        f"left behind by training: {extraction.files_after_train[:8]}; {summary.group(0)}"
    )
    loaded, invalid, missing, failed = map(int, summary.groups())
    assert loaded >= 96 and (invalid, missing, failed) == (0, 0, 0), summary.group(0)
    generated = int(re.search(r"server: (\d+) generated", summary.group(0)).group(1))
    assert generated >= 96, summary.group(0)  # every row (train and validation) came from vLLM at least once
    before = float(re.search(r"validation tau_sim before: ([\d.]+)", out).group(1))
    after = float(re.search(r"validation tau_sim after: +([\d.]+)", out).group(1))
    assert before < 1.5 and after > 3.0, (before, after)
    assert (extraction.checkpoints / "checkpoint_best" / "model.safetensors").is_file()


@dataclass
class Acceptance:
    vllm_trained: float
    vllm_untrained: float
    generate_trained: float
    serve_command: str


def acceptance_length(report: Path) -> float:
    from mtptune.evaluation.result import RESULT_FILE, EvaluationResult

    return EvaluationResult.load(report / RESULT_FILE).acceptance_length


def measure_on_vllm(example: Example, model: Path, name: str) -> tuple[float, str]:
    """Serve `model` with the command `evaluate vllm --serve-command` prints; `evaluate vllm --endpoint` it."""
    root = example.root
    printed = run_mtptune("evaluate", "vllm", "--serve-command", model, "--num-steps", K, cwd=root).stdout.strip()
    argv = shlex.split(printed)
    assert argv[:2] == ["vllm", "serve"], printed
    port = free_port()
    serve = [VLLM_PYTHON, "-m", "vllm.entrypoints.cli.main", *argv[1:], "--host", "127.0.0.1", "--port", port]
    with vllm_server([*serve, *FAST_START, *SMALL_KV_CACHE], port, root / f"vllm_mtp_{name}.log") as base:
        run_mtptune(
            "evaluate", "vllm", "--endpoint", base + "/v1", "--prompts", example.test_prompts,
            "--max-tokens", MAX_TOKENS, "--num-steps", K, "--output", f"report_vllm_{name}", "--no-plot", cwd=root,
        )  # fmt: skip
    return acceptance_length(root / f"report_vllm_{name}"), printed


@pytest.fixture(scope="module")
def acceptance(extraction: ExtractionRun, example: Example) -> Acceptance:
    root = example.root
    stitched = root / "stitched"
    run_mtptune(
        "stitch", extraction.checkpoints / "checkpoint_best", example.verifier, "--output-path", stitched, cwd=root
    )
    trained, command = measure_on_vllm(example, stitched, "trained")
    untrained, _ = measure_on_vllm(example, example.verifier, "untrained")  # its native head: random
    run_mtptune(
        "evaluate", "generate", "--head", stitched, "--prompts", example.test_prompts,
        "--max-new-tokens", MAX_TOKENS, "--num-steps", K, "--output", "report_generate", "--no-plot", cwd=root,
    )  # fmt: skip
    return Acceptance(trained, untrained, acceptance_length(root / "report_generate"), command)


def test_vllm_acceptance_agrees_with_mtptunes_speculative_decoding(acceptance: Acceptance) -> None:
    print(
        f"acceptance length, K={K}: vLLM {acceptance.vllm_trained:.3f}, mtptune generate {acceptance.generate_trained:.3f}"
    )
    assert abs(acceptance.vllm_trained - acceptance.generate_trained) <= 0.25
    assert "--speculative-config" in acceptance.serve_command


def test_trained_head_is_accepted_far_more_than_the_untrained_one(acceptance: Acceptance) -> None:
    print(
        f"vLLM acceptance length, K={K}: untrained {acceptance.vllm_untrained:.3f}, trained {acceptance.vllm_trained:.3f}"
    )
    assert acceptance.vllm_untrained < 1.5
    assert acceptance.vllm_trained > 3.0
