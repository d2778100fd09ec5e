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

Multi-turn prompts (`Dialogue`): turn k's prompt is rendered from the speculative output of turns 0..k-1 (the
verifier's own answers: at temperature 0 identical to its greedy answers, near-ties aside); each turn is one
decoded prompt. Sampling is seeded per prompt (`prompt_seed`), so a run split over worker processes draws the same
tokens as one process.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

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
def propose_drafts(head: MtpHead, sequence: torch.Tensor, hidden: torch.Tensor, num_steps: int) -> list[int]:
    """K argmax drafts after `sequence` [L] given the verifier's post-norm states `hidden` [L-1, H] of its first
    L-1 tokens. Mirrors MtpHead.forward, but step k's input token is the head's own draft k-1; steps k >= 1 are
    computed for the last slot only (the other rows of those steps never feed the draft)."""
    T = hidden.shape[0]  # slots with a hidden state; the last one reads the newest token x_{L-1}
    positions = torch.arange(T, device=hidden.device)[None]
    chain = ChainAttentionState(doc_ids=document_ids(positions), backend="dense")
    g = head.step(sequence[1 : T + 1][None], hidden.to(head.fc.weight.dtype)[None], positions, chain)
    g = g[:, -1:]
    # Later steps: one query row (slot T-1) against the step-0 keys of every slot plus its own chain.
    chain._mask_cache[0] = chain.prefix_mask()[:, :, -1:, :]
    last = positions[:, -1:]
    draft = int(head.logits(g[0, -1]).argmax())
    drafts = [draft]
    for k in range(1, num_steps):
        g = head.step(sequence.new_tensor([[draft]]), g, last + k, chain)
        draft = int(head.logits(g[0, -1]).argmax())
        drafts.append(draft)
    return drafts


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # the generator lives on the CPU
    return int(torch.multinomial(probs, 1, generator=generator))


def greedy_accept(drafts: list[int], targets: list[int]) -> tuple[int, int]:
    """verify_drafts at temperature 0 given the verifier's argmax at each of the K+1 positions."""
    accepted = next((i for i, (d, t) in enumerate(zip(drafts, targets)) if d != t), len(drafts))
    return accepted, targets[accepted]


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
    return len(drafts), _pick(logits[len(drafts)], temperature, generator)


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
    first = _pick(verifier.logits(hidden[-1]), temperature, generator)
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
        new = [*drafts[:accepted], bonus]
        # Tokens after a stop token are never produced by serving either.
        for i, token in enumerate(new):
            if token in stop_tokens:
                new = new[: i + 1]
                break
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
        logits = raw.float()
        top = logits.topk(2).values
        eps = torch.finfo(raw.dtype).eps
        margins.append(GreedyMargin(float(top[0] - top[1]), 2 * eps * float(top[0].abs())))
        token = int(logits.argmax())
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


@dataclass(frozen=True)
class Dialogue:
    """A prompt of one or more turns. `render(answers)` gives turn k's prompt ids from the verifier's own answers
    (token ids of the speculative output) to turns 0..k-1; `index` seeds its sampling (`prompt_seed`)."""

    prompt_id: str
    num_turns: int
    render: Callable[[list[list[int]]], list[int]]
    index: int = 0


def single_turn(prompt_id: str, ids: list[int], index: int = 0) -> Dialogue:
    return Dialogue(prompt_id, 1, lambda answers: list(ids), index)


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt `index`: independent of which process decodes it, distinct across (seed, index)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class GenerationRun:
    accept_lengths: list[int]
    generated_tokens: int
    baseline_generated_tokens: int
    verifier_steps: int
    baseline_verifier_steps: int
    seconds: float
    baseline_seconds: float
    numerical_ties: int
    prompts: int = 0  # prompts (turns) decoded (fewer than given when max_seconds ran out)
    conversations: int = 0  # dialogues decoded (= prompts for single-turn prompts)
    turn_accept_lengths: list[list[int]] = field(default_factory=list)  # [turn k] -> accept lengths of that turn

    @staticmethod
    def merge(runs: Sequence[GenerationRun]) -> GenerationRun:
        """Runs over disjoint prompt sets (worker processes) as one."""
        turns = max((len(r.turn_accept_lengths) for r in runs), default=0)
        return GenerationRun(
            accept_lengths=[a for r in runs for a in r.accept_lengths],
            generated_tokens=sum(r.generated_tokens for r in runs),
            baseline_generated_tokens=sum(r.baseline_generated_tokens for r in runs),
            verifier_steps=sum(r.verifier_steps for r in runs),
            baseline_verifier_steps=sum(r.baseline_verifier_steps for r in runs),
            seconds=sum(r.seconds for r in runs),
            baseline_seconds=sum(r.baseline_seconds for r in runs),
            numerical_ties=sum(r.numerical_ties for r in runs),
            prompts=sum(r.prompts for r in runs),
            conversations=sum(r.conversations for r in runs),
            turn_accept_lengths=[
                [a for r in runs if k < len(r.turn_accept_lengths) for a in r.turn_accept_lengths[k]]
                for k in range(turns)
            ],
        )


def run_generation(
    verifier: VerifierForward,
    head: MtpHead,
    prompts: Sequence[tuple[str, list[int]] | Dialogue],
    max_new_tokens: int,
    num_steps: int,
    temperature: float = 0.0,
    seed: int = 0,
    tie_tolerance: float = 0.0,
    stop_tokens: set[int] | None = None,
    verify_hook: VerifyHook | None = None,
    log: Callable[[str], None] | None = None,
    max_seconds: float | None = None,
    greedy_baseline: bool = True,
    batch_size: int = 1,
) -> GenerationRun:
    """Speculative decoding of every prompt (every turn of a `Dialogue`), plus plain greedy decoding of the same
    prompts; at temperature 0 the two outputs must be identical (LosslessError otherwise). `greedy_baseline=False`
    (temperature > 0 only) skips the greedy decoding: no tokens/s comparison.

    Full-attention verifiers decode `batch_size` dialogues together, turn by turn (`batched_decoding`); others one
    at a time with this module's recompute path. With `max_seconds`, no new batch of
    dialogues starts once that much time has passed (at least one always runs); `prompts` / `conversations` in the
    result say how many ran."""
    if not greedy_baseline and temperature <= 0:
        raise MtpTuneError("at temperature 0 the greedy baseline is the lossless check; it cannot be skipped.")
    started = time.perf_counter()
    stop = verifier.eos_token_ids if stop_tokens is None else stop_tokens
    dialogues = [p if isinstance(p, Dialogue) else single_turn(p[0], p[1], i) for i, p in enumerate(prompts)]
    batch_size = batch_size if verifier.supports_kv_rollback else 1
    accept_lengths: list[int] = []
    by_turn: list[list[int]] = [[] for _ in range(max((d.num_turns for d in dialogues), default=0))]
    tokens = base_tokens = steps = base_steps = ties = 0
    seconds = base_seconds = 0.0
    done = conversations = 0
    for first in range(0, len(dialogues), batch_size):
        if conversations and max_seconds is not None and time.perf_counter() - started >= max_seconds:
            if log is not None:
                log(f"stopping after {conversations} of {len(dialogues)} prompts: the time budget of {max_seconds:g} s is spent")  # fmt: skip
            break
        chunk = dialogues[first : first + batch_size]
        generators = {d.index: torch.Generator().manual_seed(prompt_seed(seed, d.index)) for d in chunk}
        answers: dict[int, list[list[int]]] = {d.index: [] for d in chunk}
        for turn in range(max(d.num_turns for d in chunk)):
            live = [d for d in chunk if d.num_turns > turn]
            ids = [d.render(answers[d.index]) for d in live]
            gens = [generators[d.index] for d in live]
            specs = _decode(verifier, head, ids, max_new_tokens, num_steps, temperature, gens, stop, verify_hook)
            greedies = _decode(verifier, None, ids, max_new_tokens, 0, 0.0, None, stop) if greedy_baseline else None
            for n, (dialogue, spec) in enumerate(zip(live, specs)):
                prompt_id = dialogue.prompt_id if dialogue.num_turns == 1 else f"{dialogue.prompt_id}#turn{turn + 1}"
                if greedies is not None:
                    greedy, margins = greedies[n]
                    if temperature <= 0 and not check_lossless(prompt_id, spec, greedy, margins, tie_tolerance):
                        ties += 1
                    base_tokens += len(greedy.tokens)
                    base_steps += greedy.verifier_steps
                    base_seconds += greedy.seconds
                answers[dialogue.index].append(spec.tokens)
                accept_lengths += spec.accept_lengths
                by_turn[turn] += spec.accept_lengths
                tokens += len(spec.tokens)
                steps += spec.verifier_steps
                seconds += spec.seconds
                done += 1
                if log is not None:
                    drafts = max(1, len(spec.accept_lengths))
                    log(
                        f"[{first + chunk.index(dialogue) + 1}/{len(dialogues)}] {prompt_id}: {len(spec.tokens)} "
                        f"tokens in {spec.verifier_steps} verifier steps (AL {1 + sum(spec.accept_lengths) / drafts:.2f})"
                    )
        conversations += len(chunk)
    run = GenerationRun(accept_lengths, tokens, base_tokens, steps, base_steps, seconds, base_seconds, ties)
    return replace(run, prompts=done, conversations=conversations, turn_accept_lengths=by_turn)


def _decode(
    verifier: VerifierForward,
    head: MtpHead | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    num_steps: int,
    temperature: float,
    generators: list[torch.Generator] | None,
    stop_tokens: set[int],
    verify_hook: VerifyHook | None = None,
):
    """Speculative (head given: a list of Decoded) or plain greedy decoding (head None: a list of (Decoded, margins))
    of `prompts`: all together with one KV cache (`batched_decoding`) for a full-attention verifier, else the one
    prompt `run_generation` passes with the recompute path."""
    if verifier.supports_kv_rollback:
        from mtptune.evaluation.batched_decoding import decode_batch

        outs, margins = decode_batch(
            verifier, head, prompts, max_new_tokens, num_steps, temperature, generators, stop_tokens, verify_hook
        )
        return list(zip(outs, margins)) if head is None else outs
    if head is None:
        return [greedy_decode(verifier, prompts[0], max_new_tokens, stop_tokens)]
    generator = generators[0] if generators else None
    return [
        speculative_decode(
            verifier, head, prompts[0], max_new_tokens, num_steps, temperature, generator, stop_tokens, verify_hook
        )
    ]
