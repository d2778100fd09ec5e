"""Real speculative decoding with the verifier and the head, as vLLM's MTP drafter does it (docs/contracts.md, "Attention pattern").

Each round: the head's first pass runs over every slot with a hidden state (slot t: token x_{t+1}, hidden h_t,
position t), then K-1 recursive steps on the last slot (input = previous draft, hidden = previous output,
position +1 per step). One verifier forward over [sequence + drafts] checks them (`verify_drafts`).

Acceptance rule (`verify_drafts`), the one vLLM applies to MTP / EAGLE drafts:
* temperature 0: draft i is accepted iff it is the verifier's argmax at its position; the first miss is replaced by
  that argmax, and when all K are accepted the verifier's argmax after them is the bonus token. The output is
  plain greedy decoding token for token (checked by `check_lossless`).
* temperature T > 0: the standard speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): accept
  draft x with probability min(1, p(x) / q(x)), else emit a token drawn from normalize(max(0, p - q)) and stop the
  round; p = softmax(verifier logits / T) at that position. vLLM's MTP drafter proposes the argmax of its own logits
  and hands the rejection sampler no draft probabilities (`draft_probs=None`): q is then a point mass at x, so the
  rule becomes "accept x with probability p(x); on a rejection sample from p with p(x) set to 0, renormalized" —
  vLLM's `rejection_random_sample_kernel` (draft_prob taken as 1: accept iff p(x) >= u, u ~ U[0, 1)) and
  `sample_recovered_tokens_kernel` (the draft token's probability zeroed) in vllm/v1/sample/rejection_sampler.py.
  That is what is implemented here. It is exact whatever the head: P(emit x) = p(x) * 1 and, for y != x,
  P(emit y) = (1 - p(x)) * p(y) / (1 - p(x)) = p(y), so every emitted token follows the verifier's distribution
  (tests/evaluation/test_sampling_distribution.py checks this with a chi-square test and shows that wrong rules
  fail it). Not modelled: vLLM's top-k / top-p / penalties on the target probabilities (plain temperature here).

Two paths decode: this module's `speculative_decode` / `greedy_decode` recompute the verifier's whole sequence every
round (one prompt; always correct, whatever the verifier's layers: Gated DeltaNet / linear-attention state never has
to be rolled back) and are the reference; full-attention verifiers (Llama, Qwen2, DeepSeek) decode through
`batched_decoding`, one KV cache for a batch of prompts with rejected drafts masked out, equal to the reference up
to rounding (tests/evaluation/test_batched_decoding.py). The greedy baseline always takes the same path as the
speculative run, so the tokens/s ratio measures the verifier steps saved. Head: the first pass runs over every
slot; steps k >= 1 run on the last slot only (it attends to the prefix's step-0 keys plus its own chain, exactly as
the full-width computation does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtptune.errors import MtpTuneError
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.chain_attention import ChainAttentionState, document_ids
from mtptune.modeling.head import MtpHead


class LosslessError(MtpTuneError):
    """Speculative decoding at temperature 0 produced a different token than plain greedy decoding."""


@dataclass
class Decoded:
    """One prompt's generation: new tokens, per-verification accepted draft counts, verifier forwards."""

    tokens: list[int]
    accept_lengths: list[int] = field(default_factory=list)
    draft_slots: list[int] = field(default_factory=list)  # per draft: the slot t (in prompt + tokens) it drafted from
    verifier_steps: int = 0
    seconds: float = 0.0


# Hook for tests and debugging: maps (verifier logits rows [K+1, V]) -> the rows actually used for verification.
VerifyHook = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def propose_drafts_batch(
    head: MtpHead, sequences: list[list[int]], hiddens: list[torch.Tensor], num_steps: int
) -> list[list[int]]:
    """K argmax drafts per row. Row b: tokens `sequences[b]` [L_b], the verifier's post-norm states `hiddens[b]`
    [L_b - 1, H] of its first L_b - 1 tokens. Mirrors MtpHead.forward, but step k's input token is the head's own
    draft k-1; steps k >= 1 are computed for each row's last slot only (the other slots of those steps never feed a
    draft). Rows are right-padded: the causal pattern keeps the padding out of the real slots."""
    device, dtype = head.fc.weight.device, head.fc.weight.dtype
    lengths = [h.shape[0] for h in hiddens]  # slots with a hidden state; slot t reads token t + 1
    B, T = len(hiddens), max(lengths)
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    hidden = torch.zeros(B, T, hiddens[0].shape[-1], dtype=dtype, device=device)
    for b, (sequence, states) in enumerate(zip(sequences, hiddens)):
        tokens[b, : lengths[b]] = torch.tensor(sequence[1 : lengths[b] + 1], device=device)
        hidden[b, : lengths[b]] = states.to(dtype)
    positions = torch.arange(T, device=device).expand(B, T)  # padding continues the row: causally invisible
    chain = ChainAttentionState(doc_ids=document_ids(positions), backend="dense")
    g = head.step(tokens, hidden, positions, chain)
    rows = torch.arange(B, device=device)
    last = torch.tensor(lengths, device=device) - 1
    g = g[rows, last][:, None]
    # Later steps: one query per row (its last slot) against the step-0 keys of its slots plus its own chain.
    chain._mask_cache[0] = chain.prefix_mask()[rows, :, last][:, :, None]
    draft = head.logits(g[:, -1]).argmax(dim=-1)
    drafts = [draft]
    for k in range(1, num_steps):
        g = head.step(draft[:, None], g, (last + k)[:, None], chain)
        draft = head.logits(g[:, -1]).argmax(dim=-1)
        drafts.append(draft)
    return torch.stack(drafts, dim=1).tolist()


def propose_drafts(head: MtpHead, sequence: torch.Tensor, hidden: torch.Tensor, num_steps: int) -> list[int]:
    """K argmax drafts after `sequence` [L] given the verifier's post-norm states `hidden` [L-1, H] of its first
    L-1 tokens: `propose_drafts_batch` for one row."""
    return propose_drafts_batch(head, [sequence.tolist()], [hidden], num_steps)[0]


def pick_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # the generator lives on the CPU
    return int(torch.multinomial(probs, 1, generator=generator))


def greedy_accept(drafts: list[int], targets: list[int]) -> tuple[int, int]:
    """verify_drafts at temperature 0 given the verifier's argmax at each of the K+1 positions."""
    accepted = next((i for i, (d, t) in enumerate(zip(drafts, targets)) if d != t), len(drafts))
    return accepted, targets[accepted]


def emitted(drafts: list[int], accepted: int, bonus: int, stop_tokens: set[int]) -> list[int]:
    """The tokens a round emits: the accepted drafts and the bonus, cut after a stop token (serving never produces
    tokens after one either)."""
    new = [*drafts[:accepted], bonus]
    stop = next((i for i, token in enumerate(new) if token in stop_tokens), len(new) - 1)
    return new[: stop + 1]


def verify_drafts(
    drafts: list[int], logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[int, int]:
    """logits [K+1, V] at the positions predicting drafts 0..K-1 and the bonus. Returns (accepted, next token): the
    round emits drafts[:accepted] + [next token]. The rule (module docstring): greedy match at temperature 0; at
    T > 0 accept draft x with probability p(x) (q = point mass at the argmax draft, min(1, p/q) = p(x)), else draw
    the next token from p with p(x) zeroed and renormalized."""
    if temperature <= 0:  # one device sync for every position
        return greedy_accept(drafts, logits[: len(drafts) + 1].argmax(dim=-1).tolist())
    for i, draft in enumerate(drafts):
        p = torch.softmax(logits[i].float().cpu() / temperature, dim=-1)
        u = torch.rand((), generator=generator)
        if u < p[draft]:  # min(1, p(x) / q(x)) with q one-hot at x
            continue
        residual = p.clone()
        residual[draft] = 0.0  # max(0, p - q), q one-hot
        if residual.sum() <= 0:
            return i, draft
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), pick_token(logits[len(drafts)], temperature, generator)


@torch.no_grad()
def speculative_decode(
    verifier: VerifierForward,
    head: MtpHead,
    prompt: list[int],
    max_new_tokens: int,
    num_steps: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    stop_tokens: set[int] | None = None,
    verify_hook: VerifyHook | None = None,
) -> Decoded:
    stop_tokens = stop_tokens or set()
    start = time.perf_counter()
    sequence = torch.tensor(prompt, device=verifier.device)
    # prefill: the first token comes from the verifier alone
    hidden = verifier.hidden_states(sequence)
    first = pick_token(verifier.logits(hidden[-1]), temperature, generator)
    out = Decoded(tokens=[first], verifier_steps=1)
    sequence = torch.cat([sequence, sequence.new_tensor([first])])
    while len(out.tokens) < max_new_tokens and out.tokens[-1] not in stop_tokens:
        drafts = propose_drafts(head, sequence, hidden, num_steps)
        L = sequence.shape[0]
        hidden_new = verifier.hidden_states(torch.cat([sequence, sequence.new_tensor(drafts)]))[L - 1 :]
        out.verifier_steps += 1
        logits = verifier.logits(hidden_new)  # predicts drafts 0..K-1 and the bonus
        if verify_hook is not None:
            logits = verify_hook(logits)
        accepted, bonus = verify_drafts(drafts, logits, temperature, generator)
        out.accept_lengths.append(accepted)
        out.draft_slots.append(L - 2)
        new = emitted(drafts, accepted, bonus, stop_tokens)
        out.tokens.extend(new)
        sequence = torch.cat([sequence, sequence.new_tensor(new)])
        # States of the accepted prefix are exact (causal); the bonus token's state comes next round.
        hidden = torch.cat([hidden, hidden_new[: accepted + 1]])[: sequence.shape[0] - 1]
    out.tokens = out.tokens[:max_new_tokens]
    out.seconds = time.perf_counter() - start
    return out


@dataclass(frozen=True)
class GreedyMargin:
    """How decided a greedy choice was: the top-1 minus top-2 logit, and the rounding step of the logits' dtype
    at the top logit (2 ulps). A choice within rounding may flip between forwards of different lengths."""

    margin: float
    rounding: float

    def is_tie(self, tolerance: float) -> bool:
        return self.margin <= max(tolerance, self.rounding)


def greedy_margins(logits: torch.Tensor) -> list[GreedyMargin]:
    """Per row of [B, V] logits: the top-1 minus top-2 logit (in fp32) and 2 ulps of the logits' dtype at the top."""
    top = logits.float().topk(2, dim=-1).values
    eps = torch.finfo(logits.dtype).eps
    return [GreedyMargin(d, 2 * eps * abs(t)) for d, t in zip((top[:, 0] - top[:, 1]).tolist(), top[:, 0].tolist())]


@torch.no_grad()
def greedy_decode(
    verifier: VerifierForward, prompt: list[int], max_new_tokens: int, stop_tokens: set[int] | None = None
) -> tuple[Decoded, list[GreedyMargin]]:
    """Plain greedy decoding, one full verifier forward per token. Also returns each step's margin so that a
    mismatch can be told apart from a numerical near-tie."""
    stop_tokens = stop_tokens or set()
    start = time.perf_counter()
    sequence = list(prompt)
    out = Decoded(tokens=[])
    margins: list[GreedyMargin] = []
    while len(out.tokens) < max_new_tokens and not (out.tokens and out.tokens[-1] in stop_tokens):
        hidden = verifier.hidden_states(torch.tensor(sequence, device=verifier.device))
        raw = verifier.logits(hidden[-1])
        margins += greedy_margins(raw[None])
        token = int(raw.float().argmax())
        out.tokens.append(token)
        out.verifier_steps += 1
        sequence.append(token)
    out.seconds = time.perf_counter() - start
    return out, margins


def check_lossless(
    prompt_id: str, speculative: Decoded, greedy: Decoded, margins: list[GreedyMargin], tie_tolerance: float
) -> bool:
    """Raise LosslessError at the first differing position unless the greedy choice there was a near-tie
    (top-2 margin within the logits' rounding or tie_tolerance), which forwards of different lengths may flip.
    Returns False for such a tie (the texts diverge from there), True when identical."""
    for pos, (a, b) in enumerate(zip(speculative.tokens, greedy.tokens)):
        if a != b:
            if margins[pos].is_tie(tie_tolerance):
                return False
            raise LosslessError(
                f"prompt {prompt_id}: speculative decoding is not lossless — new token {pos} is {a}, plain greedy "
                f"decoding gives {b} (greedy top-2 logit margin {margins[pos].margin:.4g}, not a numerical tie). "
                "The verification step or the draft acceptance is broken."
            )
    if len(speculative.tokens) != len(greedy.tokens):
        raise LosslessError(
            f"prompt {prompt_id}: speculative decoding produced {len(speculative.tokens)} tokens, plain greedy "
            f"decoding {len(greedy.tokens)} (identical up to position {min(len(speculative.tokens), len(greedy.tokens))})."
        )
    return True
