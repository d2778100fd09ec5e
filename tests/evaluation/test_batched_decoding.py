"""Batched speculative decoding (several prompts per verifier forward, rejected drafts masked in one KV cache) gives
what the per-prompt reference path gives: the same drafts, tokens, acceptance and sampled tokens, prompt by prompt.

A tiny fp32 Llama verifier (full attention: the batched path's case) with a fresh random `llama` head; where
acceptance matters the drafts are an oracle (the verifier's own greedy continuation with one wrong token at a
position that varies round to round), so every round accepts 0..K drafts and rows leave holes of every size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtptune.checkpoint.verifier import Verifier
from mtptune.convert import convert_model
from mtptune.evaluation import batched_decoding, speculative
from mtptune.evaluation.batched_decoding import decode_batch, propose_drafts_batch
from mtptune.evaluation.generation_run import Dialogue, run_generation
from mtptune.evaluation.speculative import greedy_decode, propose_drafts, speculative_decode
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.load import load_head

VOCAB = 300
K = 3
LENGTHS = (5, 11, 8, 16)


def write_llama_and_head(root: Path, lm_head_scale: float = 1.0) -> tuple[Path, Path]:
    """A tiny random Llama verifier (logits scaled by `lm_head_scale`) and a fresh random head for it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, eos_token_id=VOCAB - 1,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    model.save_pretrained(root / "llama")
    head_dir = convert_model(root / "llama", output_path=root / "head", init="random", num_speculative_steps=K)
    return root / "llama", head_dir


def random_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    verifier_dir, head_dir = write_llama_and_head(Path(tmp_path_factory.mktemp("batched")))
    forward = VerifierForward.load(Verifier.open(str(verifier_dir)), dtype=torch.float32)
    head, _, _ = load_head(head_dir, str(verifier_dir), dtype=torch.float32)
    return forward, head.eval(), random_prompts()


def oracle(forward: VerifierForward):
    """Drafts = the verifier's greedy continuation, one token wrong at position len(sequence) % (K + 1)."""

    def drafts_for(sequence: list[int]) -> list[int]:
        greedy, _ = greedy_decode(forward, sequence, K, stop_tokens=set())
        drafts = greedy.tokens + [0] * (K - len(greedy.tokens))
        wrong = len(sequence) % (K + 1)
        if wrong < K:
            drafts[wrong] = (drafts[wrong] + 1) % (VOCAB - 1)
        return drafts

    return drafts_for


@pytest.fixture
def oracle_drafts(llama, monkeypatch):
    drafts_for = oracle(llama[0])
    monkeypatch.setattr(speculative, "propose_drafts", lambda head, seq, hidden, k: drafts_for(seq.tolist()))
    monkeypatch.setattr(batched_decoding, "propose_drafts_batch", lambda head, seqs, hiddens, k: [drafts_for(s) for s in seqs])  # fmt: skip


def test_batched_drafts_equal_each_rows_own(llama) -> None:
    forward, head, prompts = llama
    sequences = [torch.tensor(p) for p in prompts]
    hiddens = [forward.hidden_states(s)[:-1] for s in sequences]
    batched = propose_drafts_batch(head, [s.tolist() for s in sequences], hiddens, K)
    assert batched == [propose_drafts(head, s, h, K) for s, h in zip(sequences, hiddens)]


def test_batched_greedy_decoding_equals_plain_greedy(llama) -> None:
    forward, _, prompts = llama
    stop = {greedy_decode(forward, prompts[1], 12, set())[0].tokens[9]}  # one row stops early: rows leave the batch
    outs, margins = decode_batch(forward, None, prompts, 20, K, stop_tokens=stop)
    for prompt, out, margin in zip(prompts, outs, margins):
        reference, reference_margins = greedy_decode(forward, prompt, 20, stop)
        assert out.tokens == reference.tokens and out.verifier_steps == reference.verifier_steps
        assert [m.margin for m in margin] == pytest.approx([m.margin for m in reference_margins], abs=1e-4)
    assert min(len(o.tokens) for o in outs) < 20


@pytest.mark.usefixtures("oracle_drafts")
@pytest.mark.parametrize("temperature", [0.0, 0.05, 0.7])
def test_batched_speculative_decoding_equals_the_per_prompt_path(llama, temperature: float) -> None:
    forward, head, prompts = llama
    stop = {greedy_decode(forward, prompts[2], 12, set())[0].tokens[10]}
    seeds = range(len(prompts))
    outs, _ = decode_batch(
        forward, head, prompts, 30, K, temperature, [torch.Generator().manual_seed(s) for s in seeds], stop
    )
    for prompt, seed, out in zip(prompts, seeds, outs):
        reference = speculative_decode(
            forward, head, prompt, 30, K, temperature, torch.Generator().manual_seed(seed), stop
        )
        assert out.tokens == reference.tokens
        assert out.accept_lengths == reference.accept_lengths
        assert out.draft_slots == reference.draft_slots and out.verifier_steps == reference.verifier_steps
    if temperature < 0.1:  # the oracle's drafts are (nearly) the argmax: rows leave holes of every size
        assert {a for o in outs for a in o.accept_lengths} == set(range(K + 1))


@pytest.mark.usefixtures("oracle_drafts")
def test_run_generation_in_batches_equals_one_at_a_time(llama) -> None:
    """Multi-turn dialogues (turn 2 rendered from the turn-1 answer) mixed with single prompts, over batches of 3."""
    forward, head, prompts = llama

    def dialogue(i: int, prompt: list[int], turns: int) -> Dialogue:
        return Dialogue(f"d{i}", turns, lambda answers: [t for a in answers for t in (*a[:4], 7)] + prompt, i)

    dialogues = [dialogue(i, p, 1 + i % 2) for i, p in enumerate(prompts)]
    one = run_generation(forward, head, dialogues, 16, K, stop_tokens=set())
    batched = run_generation(forward, head, dialogues, 16, K, stop_tokens=set(), batch_size=3)
    assert batched.accept_lengths == one.accept_lengths and batched.turn_accept_lengths == one.turn_accept_lengths
    assert (batched.generated_tokens, batched.baseline_generated_tokens) == (one.generated_tokens, one.baseline_generated_tokens)  # fmt: skip
    assert (batched.prompts, batched.conversations) == (one.prompts, one.conversations) == (6, 4)
    assert batched.numerical_ties == one.numerical_ties == 0


def test_masked_slots_are_invisible_to_later_tokens(llama) -> None:
    """Rows of different lengths; row 0 rejects 2 of 4 appended tokens, row 1 keeps all: the next tokens' states
    equal a fresh forward over each row's kept tokens only."""
    forward, _, prompts = llama
    rows = [prompts[0], prompts[3]]
    cache = batched_decoding.BatchKvCache(forward, rows)
    for row, hidden in zip(rows, cache.prefill_hidden):
        torch.testing.assert_close(hidden, forward.hidden_states(torch.tensor(row)), atol=1e-5, rtol=1e-5)
    appended = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])
    cache.extend(appended, torch.tensor([[len(r) + i for i in range(4)] for r in rows]))
    cache.reject(0, 2)
    kept = [rows[0] + [11, 12], rows[1] + [21, 22, 23, 24]]
    tail = cache.extend(torch.tensor([[31, 32], [41, 42]]), torch.tensor([[len(k), len(k) + 1] for k in kept]))
    for i, (k, new) in enumerate(zip(kept, ([31, 32], [41, 42]))):
        fresh = forward.hidden_states(torch.tensor(k + new))[-2:]
        torch.testing.assert_close(tail[i], fresh, atol=1e-5, rtol=1e-5)
