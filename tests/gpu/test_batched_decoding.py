"""GPU: batched speculative decoding (one verifier forward per round for several prompts, rejected drafts masked in
one KV cache) gives the per-prompt path's tokens and acceptance on the device, and passes the lossless check in
bf16 (the serving dtype) against batched greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtptune.checkpoint.verifier import Verifier
from mtptune.convert import convert_model
from mtptune.evaluation import batched_decoding, speculative
from mtptune.evaluation.batched_decoding import decode_batch
from mtptune.evaluation.speculative import run_generation, speculative_decode
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.load import load_head

from ..evaluation.test_batched_decoding import LENGTHS, VOCAB, K, oracle
from .conftest import needs_device

pytestmark = [pytest.mark.gpu, needs_device]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, eos_token_id=VOCAB - 1,
    )  # fmt: skip
    root = Path(tmp_path_factory.mktemp("gpu-batched"))
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked logits: sampling accepts the oracle's drafts often
    model.save_pretrained(root / "llama")
    head = convert_model(root / "llama", output_path=root / "head", init="random", num_speculative_steps=K)
    return root / "llama", head


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_batched_equals_per_prompt_on_the_device(llama_dir, device, monkeypatch, temperature: float) -> None:
    verifier_dir, head_dir = llama_dir
    forward = VerifierForward.load(Verifier.open(str(verifier_dir)), dtype=torch.float32, device=device)
    head, _, _ = load_head(head_dir, str(verifier_dir), device=device, dtype=torch.float32)
    drafts_for = oracle(forward)
    monkeypatch.setattr(speculative, "propose_drafts", lambda h, seq, hidden, k: drafts_for(seq.tolist()))
    monkeypatch.setattr(batched_decoding, "propose_drafts_batch", lambda h, seqs, hiddens, k: [drafts_for(s) for s in seqs])  # fmt: skip
    prompts = _prompts()
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
    prompts = [(f"p{i}", p) for i, p in enumerate(_prompts())]
    run = run_generation(forward, head, prompts, 40, K, stop_tokens=set(), batch_size=len(prompts))
    assert run.prompts == len(prompts) and run.generated_tokens == run.baseline_generated_tokens == 40 * len(prompts)
