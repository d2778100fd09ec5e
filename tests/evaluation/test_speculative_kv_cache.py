"""Speculative decoding with a verifier KV cache (full-attention verifiers): crop-after-reject equals recompute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtptune.checkpoint.verifier import Verifier
from mtptune.evaluation import speculative
from mtptune.evaluation.speculative import greedy_decode, speculative_decode
from mtptune.evaluation.verifier_forward import VerifierForward

VOCAB = 500
K = 3


@pytest.fixture(scope="module")
def llama_forward(tmp_path_factory: pytest.TempPathFactory) -> VerifierForward:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, eos_token_id=VOCAB - 1,
    )  # fmt: skip
    path = Path(tmp_path_factory.mktemp("llama")) / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return VerifierForward.load(Verifier.open(str(path)), dtype=torch.float32)


def test_cache_extend_and_crop_equal_a_fresh_forward(llama_forward: VerifierForward) -> None:
    assert llama_forward.supports_kv_rollback
    ids = torch.randint(0, VOCAB - 1, (20,))
    cache = llama_forward.new_cache()
    cache.extend(ids[:12])
    cache.extend(torch.randint(0, VOCAB - 1, (4,)))  # rejected drafts
    cache.crop(12)
    tail = cache.extend(ids[12:])
    torch.testing.assert_close(tail, llama_forward.hidden_states(ids)[12:], atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_recompute_and_greedy(llama_forward: VerifierForward, monkeypatch) -> None:
    """Drafts = the verifier's own greedy continuation with one wrong token at a varying position, so every round
    accepts 0..K tokens and the cache must be cropped by a different amount each time."""

    def oracle_drafts(head, sequence: torch.Tensor, hidden: torch.Tensor, num_steps: int) -> list[int]:
        greedy, _ = greedy_decode(llama_forward, sequence.tolist(), num_steps)
        drafts = greedy.tokens + [0] * (num_steps - len(greedy.tokens))
        wrong = len(sequence) % (num_steps + 1)
        if wrong < num_steps:
            drafts[wrong] = (drafts[wrong] + 1) % (VOCAB - 1)
        return drafts

    monkeypatch.setattr(speculative, "propose_drafts", oracle_drafts)
    prompt = torch.randint(0, VOCAB - 1, (9,)).tolist()
    cached = speculative_decode(llama_forward, None, prompt, 40, K)  # type: ignore[arg-type]
    monkeypatch.setattr(VerifierForward, "supports_kv_rollback", property(lambda self: False))
    recomputed = speculative_decode(llama_forward, None, prompt, 40, K)  # type: ignore[arg-type]
    plain, _ = greedy_decode(llama_forward, prompt, 40)
    assert cached.tokens == recomputed.tokens == plain.tokens
    assert cached.accept_lengths == recomputed.accept_lengths
    assert len(set(cached.accept_lengths)) > 1  # rounds with different rollbacks were exercised
