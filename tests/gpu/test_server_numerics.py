"""GPU: the built-in server (`mtptune serve --engine builtin --device cuda`, a real process over real HTTP) returns the
hidden states and tokens of an independent CPU fp32 forward of the HF model.

Several variable-length prompts are sent at once, so they share one right-padded capture forward on the device (and
the generation requests one left-padded decode); each request's file must still hold exactly its own rows: vLLM layer
ids 0 (embeddings), 2 and N (the last layer's residual before the final norm). Runs the server in bf16 (its default:
the checkpoint's dtype) and in fp32 (a tight check of the same code path).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

from mtptune.serving.hidden_state_files import read_hidden_states_file
from mtptune.testing.server_process import running_server

from .conftest import needs_device, rel_err

pytestmark = [pytest.mark.gpu, needs_device]

N = 4  # the tiny verifier's num_hidden_layers
LAYER_IDS = (0, 2, N)  # --target-layer-ids 0 2 (N appended)
H, VOCAB, EOS = 64, 1000, 999
MAX_MODEL_LEN = 512
LENGTHS = (1, 7, 33, 64, 100, 129, 200, 301)  # one padded batch: the 1-token prompt gets 300 padding slots
# Per dtype: (relative error of a layer over a request, of any one row, argmax near-tie margin in logits; the logits
# have std ~5). On the CPU bf16 measures ~5e-3 / 8e-3 and fp32 ~2e-7; fp32 on CUDA leaves room for TF32 in cuDNN's
# causal conv and in Triton linear-attention kernels (~5e-4 per op).
TOLERANCES = {"bfloat16": (2e-2, 6e-2, 0.5), "float32": (5e-3, 2e-2, 0.1)}


@dataclass(frozen=True)
class Server:
    base: str
    storage: Path
    dtype: str


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def server(request, qwen35_verifier: Path, device: torch.device, tmp_path_factory: pytest.TempPathFactory):
    dtype = request.param
    storage = tmp_path_factory.mktemp(f"gpu-server-{dtype}") / "hidden_states"
    with running_server(
        qwen35_verifier, storage,
        "--device", str(device), "--dtype", dtype, "--target-layer-ids", "0", "2",
        "--max-model-len", str(MAX_MODEL_LEN), "--batch-window-ms", "50",
        startup_timeout=240.0,
    ) as base:  # fmt: skip
        log = storage.parent / f"server-{base.rsplit(':', 1)[1]}.log"  # written by running_server
        loaded = [line for line in log.read_text().splitlines() if "loaded verifier" in line]
        assert loaded and re.search(rf" on {device.type}\b", loaded[0]), f"server not on {device}: {loaded}"
        yield Server(base, storage, dtype)


@pytest.fixture(scope="module")
def reference_model(qwen35_verifier: Path) -> Qwen3_5ForConditionalGeneration:
    """The HF model in fp32 on the CPU (the bf16 checkpoint upcast), independent of mtptune's runtime."""
    return Qwen3_5ForConditionalGeneration.from_pretrained(qwen35_verifier, dtype=torch.float32).eval()


def reference_forward(model: Qwen3_5ForConditionalGeneration, ids: list[int]) -> tuple[dict[int, torch.Tensor], ...]:
    """One unpadded forward: {vLLM layer id: [T, H]} (N from the last decoder layer's output, i.e. before the final
    norm), HF's post-norm last hidden state [T, H], and the logits [T, V]."""
    language_model = model.model.language_model
    grabbed: list[torch.Tensor] = []
    hook = language_model.layers[-1].register_forward_hook(
        lambda m, a, out: grabbed.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.inference_mode():
            out = language_model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
            logits = model.lm_head(out.last_hidden_state)[0]
    finally:
        hook.remove()
    states = {0: out.hidden_states[0][0], 2: out.hidden_states[2][0], N: grabbed[0][0]}
    return states, out.last_hidden_state[0], logits


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, EOS, (n,), generator=gen).tolist() for n in lengths]


async def post_all(base: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as http:
        responses = await asyncio.gather(*(http.post(base + "/v1/completions", json=b) for b in bodies))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


def counter(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"/metrics has no {name}"
    return float(match.group(1))


def assert_greedy(logits: torch.Tensor, tokens: list[int], margin: float, where: str) -> float:
    """Each token is the reference's argmax at its position, or within `margin` of it (a near-tie that the
    device's rounding may break the other way). Returns the fraction that is the exact argmax."""
    chosen = logits.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
    top = logits.max(dim=-1).values
    gaps = top - chosen
    assert bool((gaps <= margin).all()), f"{where}: tokens {tokens} trail the reference argmax by {gaps.tolist()}"
    return float((gaps == 0).double().mean())


def test_concurrent_captures_equal_the_cpu_fp32_forward(server: Server, reference_model) -> None:
    batches_before = counter(server.base, "mtptune_batches_total")
    batch = prompts(seed=11, lengths=LENGTHS)
    bodies = [{"prompt": ids, "max_tokens": 1, "temperature": 0, "return_token_ids": True} for ids in batch]
    payloads = asyncio.run(post_all(server.base, bodies))
    batches = counter(server.base, "mtptune_batches_total") - batches_before
    assert batches < len(batch), f"{len(batch)} concurrent captures ran in {batches} forwards: not batched"

    total_tol, row_tol, margin = TOLERANCES[server.dtype]
    dtype = getattr(torch, server.dtype)
    report = []
    for ids, payload in zip(batch, payloads):
        choice = payload["choices"][0]
        assert choice["prompt_token_ids"] == ids
        path = Path(payload["kv_transfer_params"]["hidden_states_path"])
        assert path.parent == server.storage.resolve()
        states = read_hidden_states_file(path, ids, len(LAYER_IDS), H).hidden_states
        assert states.dtype == dtype and states.shape == (len(ids), len(LAYER_IDS), H)
        ref, post_norm, logits = reference_forward(reference_model, ids)
        # id 0 is the embedding lookup: the bf16 checkpoint's rows, exact in either dtype.
        assert torch.equal(states[:, 0].float(), ref[0]), f"len {len(ids)}: embeddings differ (misaligned rows?)"
        for j, layer in enumerate(LAYER_IDS[1:], start=1):
            got = states[:, j].float()
            total = rel_err(got, ref[layer])
            row = float(((got - ref[layer]).norm(dim=-1) / ref[layer].norm(dim=-1)).max())
            report.append((len(ids), layer, total, row))
            assert total < total_tol and row < row_tol, f"len {len(ids)} layer {layer}: rel {total:.2e} row {row:.2e}"
        if len(ids) > 1:
            assert rel_err(states[:, -1].float(), post_norm) > 0.3  # N is the residual, not HF's post-norm output
        # The capture's greedy token comes from the last real row of the padded batch.
        assert_greedy(logits[-1:], choice["token_ids"], margin, f"capture len {len(ids)}")
    worst = max(report, key=lambda r: r[2])
    print(f"{server.dtype} server on the device: {batches:.0f} forward(s) for {len(batch)} captures; worst layer rel "
          f"err {worst[2]:.2e} (len {worst[0]}, id {worst[1]}), worst row {max(r[3] for r in report):.2e}")  # fmt: skip


def test_concurrent_greedy_generation_follows_the_cpu_fp32_model(server: Server, reference_model) -> None:
    lengths, limits = (3, 17, 40, 9, 70), (12, 5, 16, 16, 8)
    batch = prompts(seed=12, lengths=lengths)
    bodies = [
        {"prompt": ids, "max_tokens": n, "temperature": 0, "return_token_ids": True} for ids, n in zip(batch, limits)
    ]
    payloads = asyncio.run(post_all(server.base, bodies))
    _, _, margin = TOLERANCES[server.dtype]
    exact = []
    for ids, limit, payload in zip(batch, limits, payloads):
        choice = payload["choices"][0]
        tokens = choice["token_ids"]
        assert 1 <= len(tokens) <= limit
        stopped = tokens[-1] == EOS
        assert choice["finish_reason"] == ("stop" if stopped else "length")
        assert EOS not in tokens[:-1] and (stopped or len(tokens) == limit)
        assert payload["kv_transfer_params"] is None
        # Teacher-forced on the server's own tokens: position len(ids) - 1 + i predicts generated token i.
        _, _, logits = reference_forward(reference_model, ids + tokens[:-1])
        exact.append(assert_greedy(logits[len(ids) - 1 :], tokens, margin, f"generation from len {len(ids)}"))
    print(f"{server.dtype} server: generated tokens equal to the fp32 argmax: {[f'{e:.2f}' for e in exact]}")
    assert sum(exact) / len(exact) > 0.8
