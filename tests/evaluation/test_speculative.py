"""Real speculative decoding: lossless at temperature 0, AL agrees with the offline simulation, broken
verification is caught, sampling follows the rejection rule."""

from __future__ import annotations

import pytest
import torch

from mtptune.checkpoint.verifier import Verifier
from mtptune.evaluation.generation_run import run_generation
from mtptune.evaluation.offline import evaluate_offline, slot_hits
from mtptune.evaluation.speculative import (
    Decoded,
    GreedyMargin,
    LosslessError,
    check_lossless,
    propose_drafts,
    speculative_decode,
)
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.metrics.acceptance import AcceptanceCounts
from mtptune.modeling.load import load_head

from .trained_tiny import NEW_TOKENS, NUM_STEPS, TinySetup, direct_source


def generate(
    tiny: TinySetup,
    head_source,
    num_prompts: int | None = None,
    new_tokens: int = NEW_TOKENS,
    forward: VerifierForward | None = None,
    **kwargs,
):
    head, _, _ = load_head(head_source, str(tiny.verifier_dir))
    prompts = [(f"p{i}", p) for i, p in enumerate(tiny.eval_prompts[:num_prompts])]
    forward = forward or tiny.forward
    run = run_generation(forward, head, prompts, new_tokens, NUM_STEPS, stop_tokens=set(), **kwargs)
    return head, run, AcceptanceCounts.from_accept_lengths(NUM_STEPS, run.accept_lengths)


def test_trained_head_generated_al_matches_offline_tau_sim(tiny: TinySetup) -> None:
    head, run, counts = generate(tiny, tiny.trained_head)  # asserts losslessness on every prompt
    offline = evaluate_offline(head, tiny.eval_rows, direct_source(tiny), NUM_STEPS).counts
    assert run.numerical_ties == 0
    assert run.generated_tokens == run.baseline_generated_tokens == NEW_TOKENS * len(tiny.eval_prompts)
    assert run.verifier_steps < run.baseline_verifier_steps
    # Generation drafts at a subset of the slots the simulation scores: agreement within sampling noise.
    assert counts.acceptance_length > 2.0
    assert counts.acceptance_length == pytest.approx(offline.acceptance_length, abs=0.35)
    # Each verifier step yields AL tokens on average (the first step is the prefill; the last is cut at the budget).
    tokens_per_step = (run.generated_tokens - len(tiny.eval_prompts)) / (run.verifier_steps - len(tiny.eval_prompts))
    assert counts.acceptance_length - 0.3 < tokens_per_step <= counts.acceptance_length
    print(f"offline tau_sim {offline.acceptance_length:.3f}, generated AL {counts.acceptance_length:.3f}")


def test_each_generated_draft_is_accepted_as_far_as_the_offline_chain_at_its_slot(tiny: TinySetup) -> None:
    """On the verifier's own greedy text the simulation is exact: per draft, not only on average."""
    head, _, _ = load_head(tiny.trained_head, str(tiny.verifier_dir))
    compared = agreed = 0
    for prompt, row in zip(tiny.eval_prompts[:4], tiny.eval_rows[:4]):
        out = speculative_decode(tiny.forward, head, prompt, NEW_TOKENS, NUM_STEPS, stop_tokens=set())
        ids = row.input_ids
        hits, _ = slot_hits(head, ids, tiny.forward.hidden_states(ids), NUM_STEPS)
        chain = torch.cumprod(hits.long(), dim=0).sum(dim=0)  # offline accepted length per slot
        for slot, accepted in zip(out.draft_slots, out.accept_lengths):
            if slot + NUM_STEPS + 1 < len(row.input_ids):
                compared += 1
                agreed += int(chain[slot]) == accepted
    assert compared > 30
    assert agreed >= 0.95 * compared  # bf16 forwards of different lengths may flip a rare near-tie


def test_random_head_gives_no_acceptance(tiny: TinySetup) -> None:
    _, run, counts = generate(tiny, tiny.random_head, num_prompts=3, new_tokens=24)
    assert counts.acceptance_length < 1.05
    assert run.verifier_steps == pytest.approx(run.baseline_verifier_steps, rel=0.05)


def test_max_seconds_stops_starting_prompts_but_runs_at_least_one(tiny: TinySetup) -> None:
    _, run, counts = generate(tiny, tiny.random_head, num_prompts=3, new_tokens=8, max_seconds=0.0)
    assert run.prompts == 1 and run.generated_tokens == run.baseline_generated_tokens == 8
    assert counts.drafts == len(run.accept_lengths) > 0
    _, run, _ = generate(tiny, tiny.random_head, num_prompts=3, new_tokens=8, max_seconds=None)
    assert run.prompts == 3 and run.generated_tokens == 24


def test_lossless_assertion_catches_a_broken_verification_step(tiny: TinySetup) -> None:
    calls = 0

    def perturb_one_token(logits: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls != 3:
            return logits
        broken = logits.clone()
        broken[0, (int(logits[0].argmax()) + 1) % logits.shape[-1]] = logits[0].max() + 10.0
        return broken

    # An fp32 verifier: its logits round finely, so no mismatch can pass for a bf16 near-tie.
    forward = VerifierForward.load(Verifier.open(str(tiny.verifier_dir)), dtype=torch.float32)
    with pytest.raises(LosslessError, match=r"prompt p0: .*new token \d+"):
        generate(tiny, tiny.trained_head, num_prompts=2, forward=forward, verify_hook=perturb_one_token)


def test_a_mismatch_at_a_numerical_near_tie_is_counted_not_raised() -> None:
    spec, greedy = Decoded(tokens=[5, 6, 9]), Decoded(tokens=[5, 6, 7])
    decided = [GreedyMargin(1.0, 0.01)] * 3
    assert check_lossless("p", spec, spec, decided, 0.0)
    with pytest.raises(LosslessError, match="new token 2 is 9, plain greedy decoding gives 7"):
        check_lossless("p", spec, greedy, decided, 0.0)
    assert not check_lossless("p", spec, greedy, [*decided[:2], GreedyMargin(0.005, 0.01)], 0.0)
    assert not check_lossless("p", spec, greedy, decided, tie_tolerance=1.5)


def test_drafts_are_the_head_chain_on_the_last_slot(tiny: TinySetup) -> None:
    """propose_drafts = a teacher-forced forward whose inputs are the drafts themselves, read at the last slot."""
    head, _, _ = load_head(tiny.trained_head, str(tiny.verifier_dir))
    row = tiny.eval_rows[0].input_ids[:30]
    hidden = tiny.forward.hidden_states(row)
    drafts = propose_drafts(head, row, hidden[:-1], NUM_STEPS)
    ids = torch.cat([row, torch.tensor(drafts)])
    padded = torch.cat([hidden[:-1], hidden.new_zeros(NUM_STEPS + 1, hidden.shape[-1])])
    outputs = head(ids[None], padded[None], num_steps=NUM_STEPS, hidden_is_pre_norm=False)
    last = row.shape[0] - 2
    assert [int(head.logits(o[0, last]).argmax()) for o in outputs] == drafts


def test_sampling_uses_the_rejection_rule(tiny: TinySetup) -> None:
    head, _, _ = load_head(tiny.trained_head, str(tiny.verifier_dir))
    generator = torch.Generator().manual_seed(0)
    out = speculative_decode(
        tiny.forward, head, tiny.eval_prompts[0], 24, NUM_STEPS, temperature=0.7, generator=generator, stop_tokens=set()
    )
    assert len(out.tokens) == 24
    assert out.verifier_steps == 1 + len(out.accept_lengths)
    assert all(0 <= a <= NUM_STEPS for a in out.accept_lengths)
    # A tiny temperature is greedy in all but name: the draft is accepted iff it is the argmax.
    cold = speculative_decode(
        tiny.forward,
        head,
        tiny.eval_prompts[0],
        24,
        NUM_STEPS,
        temperature=1e-4,
        generator=generator,
        stop_tokens=set(),
    )
    greedy = speculative_decode(tiny.forward, head, tiny.eval_prompts[0], 24, NUM_STEPS, stop_tokens=set())
    assert cold.tokens == greedy.tokens
