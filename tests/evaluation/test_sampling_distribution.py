"""Speculative sampling keeps the verifier's distribution (issue 21, goal 3): at T = 0.7, every token a round of
speculative decoding emits follows softmax(verifier logits / T) at its position, exactly as plain sampling does.

Real components: the tiny verifier, the head trained on it and the drafts it proposes for a real context; only the
uniform draws are repeated (N rounds over the same verifier logits, seeded). Each emitted position is checked with a
chi-square goodness-of-fit test against the verifier's exact probabilities, and the first one also against plain
sampling (two-sample chi-square). Two wrong rules run through the same check and must fail it: "accept every draft"
(all mass on the draft) and "on a rejection resample from p instead of p with the draft zeroed" (the draft token
gets p + (1 - p) p = 0.75 instead of 0.5). p-values below 1e-3 fail the right rule, above 1e-6 pass a wrong one:
with 10,000 rounds (2,000 for the wrong rules) and a first draft of probability 0.5, the wrong rules land
far below 1e-30.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch

from mtptune.evaluation.speculative import propose_drafts, verify_drafts
from mtptune.modeling.load import load_head

from .trained_tiny import NUM_STEPS, TinySetup

TEMPERATURE = 0.7
ROUNDS = 10_000
WRONG_ROUNDS = 2_000  # plenty: the wrong rules miss by tens of standard deviations
Rule = Callable[[list[int], torch.Tensor, float, torch.Generator], tuple[int, int]]


def chi2_sf(stat: float, df: int) -> float:
    """P(chi2_df >= stat): the regularized upper incomplete gamma function Q(df / 2, stat / 2)."""
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


def goodness_of_fit(tokens: list[int], probs: torch.Tensor) -> float:
    """p-value of `tokens` being draws from `probs`; cells with an expected count below 5 are pooled."""
    n = len(tokens)
    observed = torch.zeros_like(probs, dtype=torch.float64)
    for token, count in Counter(tokens).items():
        observed[token] = count
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):
        return 0.0  # a token of probability 0 was emitted
    obs, exp = obs[keep], exp[keep]
    return chi2_sf(float(((obs - exp) ** 2 / exp).sum()), int(obs.numel()) - 1)


def two_sample(a: list[int], b: list[int]) -> float:
    """p-value of two samples coming from one distribution (2 x cells contingency table, rare tokens pooled)."""
    ca, cb = Counter(a), Counter(b)
    common = [t for t in set(ca) | set(cb) if ca[t] + cb[t] >= 10]
    rows = [[ca[t] for t in common] + [len(a) - sum(ca[t] for t in common)]]
    rows.append([cb[t] for t in common] + [len(b) - sum(cb[t] for t in common)])
    table = torch.tensor(rows, dtype=torch.float64)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return chi2_sf(float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1)


def accept_always(drafts: list[int], logits: torch.Tensor, temperature: float, g: torch.Generator) -> tuple[int, int]:
    """WRONG: every draft accepted (greedy drafting without verification) - the emitted tokens are the drafts."""
    probs = torch.softmax(logits[-1].float() / temperature, -1)
    return len(drafts), int(torch.multinomial(probs, 1, generator=g))


def resample_from_target(drafts: list[int], logits: torch.Tensor, temperature: float, g: torch.Generator):
    """WRONG: accept with probability p(x), but on a rejection draw from p itself (the draft may come back)."""
    for i, draft in enumerate(drafts):
        probs = torch.softmax(logits[i].float() / temperature, -1)
        if torch.rand((), generator=g) >= probs[draft]:
            return i, int(torch.multinomial(probs, 1, generator=g))
    probs = torch.softmax(logits[-1].float() / temperature, -1)
    return len(drafts), int(torch.multinomial(probs, 1, generator=g))


def emitted(rule: Rule, drafts: list[int], logits: torch.Tensor, seed: int, rounds: int = ROUNDS) -> list[list[int]]:
    """`rounds` rounds of `rule` over the same drafts and logits: the tokens each round emits."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rounds):
        accepted, token = rule(drafts, logits, TEMPERATURE, g)
        out.append([*drafts[:accepted], token])
    return out


def position_checks(rounds: list[list[int]], drafts: list[int], probs: torch.Tensor) -> list[tuple[int, float]]:
    """(samples, p-value) per emitted position k: the k-th token of the rounds whose first k tokens were the drafts
    (exactly the context the verifier's row k was computed for) against softmax(logits[k] / T)."""
    checks = []
    for k in range(len(drafts) + 1):
        tokens = [r[k] for r in rounds if len(r) > k and r[:k] == drafts[:k]]
        if len(tokens) >= 300:
            checks.append((len(tokens), goodness_of_fit(tokens, probs[k])))
    return checks


def sharpening(logits: torch.Tensor, draft: int, target: float = 0.5) -> float:
    """The factor c for which softmax(c * logits / T)[draft] = target (bisection; p grows with c for an argmax)."""
    lo, hi = 1.0, 1e4
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        p = float(torch.softmax(mid * logits / TEMPERATURE, -1)[draft])
        lo, hi = (mid, hi) if p < target else (lo, mid)
    return lo


@pytest.fixture(scope="module")
def round_inputs(tiny: TinySetup) -> tuple[list[int], torch.Tensor]:
    """A real round: the trained head's K drafts after a prefix of an evaluation row, and the verifier's logits over
    [prefix + drafts] (rows 0..K predict drafts 0..K-1 and the bonus), as speculative_decode computes them.

    The tiny random verifier is nearly uniform over its 1,000 tokens (top probability ~0.003 at T = 0.7), where
    every rule accepts almost nothing and no test has power. Its logits are therefore scaled by one factor c - the
    verifier whose output layer is c times the tiny one's, same argmax, peaked distributions - chosen so that the
    first draft has probability 0.5: both branches (accept, reject-and-resample) are frequent."""
    head, _, _ = load_head(tiny.trained_head, str(tiny.verifier_dir))
    for row in tiny.eval_rows:
        for length in range(14, len(row.input_ids) - 1, 3):
            sequence = row.input_ids[:length]
            hidden = tiny.forward.hidden_states(sequence)
            drafts = propose_drafts(head, sequence, hidden[:-1], NUM_STEPS)
            full = tiny.forward.hidden_states(torch.cat([sequence, torch.tensor(drafts)]))
            logits = tiny.forward.logits(full[length - 1 :]).float()
            if logits[:2].argmax(-1).tolist() == drafts[:2]:  # the head drafted the verifier's argmax, as trained
                return drafts, sharpening(logits[0], drafts[0]) * logits
    pytest.fail("the trained head never drafted the verifier's argmax twice in a row: the tiny setup changed")


def test_speculative_sampling_follows_the_verifier_distribution(round_inputs) -> None:
    drafts, logits = round_inputs
    probs = torch.softmax(logits / TEMPERATURE, -1)
    rounds = emitted(verify_drafts, drafts, logits, seed=0)
    checks = position_checks(rounds, drafts, probs)
    assert len(checks) >= 2  # the first token, and the one after an accepted first draft
    assert all(p_value > 1e-3 for _, p_value in checks), checks
    print(f"(samples, p-value) per emitted position: {checks}")
    # Against plain sampling from the verifier (what serving without a head does), same count, another seed.
    plain = torch.multinomial(probs[0], ROUNDS, replacement=True, generator=torch.Generator().manual_seed(1))
    assert two_sample([r[0] for r in rounds], plain.tolist()) > 1e-3
    # The acceptance rate of the first draft is p(draft) (q is a point mass at the draft).
    accepted = sum(r[0] == drafts[0] and len(r) > 1 for r in rounds) / ROUNDS
    assert accepted == pytest.approx(float(probs[0, drafts[0]]), abs=4 * (0.25 / ROUNDS) ** 0.5)


@pytest.mark.parametrize("rule", [accept_always, resample_from_target], ids=lambda r: r.__name__)
def test_a_wrong_rule_fails_the_same_check(round_inputs, rule: Rule) -> None:
    drafts, logits = round_inputs
    probs = torch.softmax(logits / TEMPERATURE, -1)
    rounds = emitted(rule, drafts, logits, seed=0, rounds=WRONG_ROUNDS)
    first_token = position_checks(rounds, drafts, probs)[0][1]
    print(f"{rule.__name__}: first-token p-value {first_token:.3g}")
    assert first_token < 1e-6
