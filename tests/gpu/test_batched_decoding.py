"""GPU: batched speculative decoding (one verifier forward per round for several prompts, rejected drafts masked in
one KV cache) gives the per-prompt path's tokens and acceptance on the device, and passes the lossless check in
bf16 (the serving dtype) against batched greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtptune.checkpoint.verifier import Verifier
from mtptune.evaluation import batched_decoding, speculative
from mtptune.evaluation.batched_decoding import decode_batch
from mtptune.evaluation.generation_run import run_generation
from mtptune.evaluation.speculative import speculative_decode
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.load import load_head

from ..evaluation.test_batched_decoding import K, oracle, random_prompts, write_llama_and_head
from .conftest import needs_device

pytestmark = [pytest.mark.gpu, needs_device]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # Peaked logits: sampling accepts the oracle's drafts often.
    return write_llama_and_head(Path(tmp_path_factory.mktemp("gpu-batched")), lm_head_scale=20.0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_batched_equals_per_prompt_on_the_device(llama_dir, device, monkeypatch, temperature: float) -> None:
    verifier_dir, head_dir = llama_dir
    forward = VerifierForward.load(Verifier.open(str(verifier_dir)), dtype=torch.float32, device=device)
    head, _, _ = load_head(head_dir, str(verifier_dir), device=device, dtype=torch.float32)
    drafts_for = oracle(forward)
    monkeypatch.setattr(speculative, "propose_drafts", lambda h, seq, hidden, k: drafts_for(seq.tolist()))
    monkeypatch.setattr(batched_decoding, "propose_drafts_batch", lambda h, seqs, hiddens, k: [drafts_for(s) for s in seqs])  # fmt: skip
    prompts = random_prompts()
    outs, _ = decode_batch(
        forward, head, prompts, 40, K, temperature, [torch.Generator().manual_seed(s) for s in range(len(prompts))]
    )
    for seed, (prompt, out) in enumerate(zip(prompts, outs)):
        ref = speculative_decode(forward, head, prompt, 40, K, temperature, torch.Generator().manual_seed(seed))
        assert (out.tokens, out.accept_lengths) == (ref.tokens, ref.accept_lengths)


def test_batched_bf16_run_is_lossless(llama_dir, device) -> None:
    verifier_dir, head_dir = llama_dir
    forward = VerifierForward.load(Verifier.open(str(verifier_dir)), dtype=torch.bfloat16, device=device)
    head, _, _ = load_head(head_dir, str(verifier_dir), device=device)
    prompts = [(f"p{i}", p) for i, p in enumerate(random_prompts())]
    run = run_generation(forward, head, prompts, 40, K, stop_tokens=set(), batch_size=len(prompts))
    assert run.prompts == len(prompts) and run.generated_tokens == run.baseline_generated_tokens == 40 * len(prompts)
