"""Speculative decoding of a set of prompts, with the greedy baseline and the lossless check: what `evaluate generate`
runs in each process.

Multi-turn prompts (`Dialogue`): turn k's prompt is rendered from the speculative output of turns 0..k-1 (the
verifier's own answers: at temperature 0 identical to its greedy answers, near-ties aside); each turn is one
decoded prompt. Sampling is seeded per prompt (`prompt_seed`), so a run split over worker processes draws the same
tokens as one process. Full-attention verifiers decode a batch of dialogues at once (`batched_decoding`), others
one at a time with `speculative`'s recompute path.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

from mtptune.errors import MtpTuneError
from mtptune.evaluation.batched_decoding import decode_batch
from mtptune.evaluation.result import DecodingTotals, GenerationStats
from mtptune.evaluation.speculative import VerifyHook, check_lossless, greedy_decode, speculative_decode
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.head import MtpHead


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


@dataclass(frozen=True, kw_only=True)
class GenerationRun(DecodingTotals):
    """The totals of one decoding run plus its accept lengths (all, and per turn: [turn k] -> that turn's)."""

    accept_lengths: list[int] = field(default_factory=list)
    turn_accept_lengths: list[list[int]] = field(default_factory=list)

    @staticmethod
    def merge(runs: Sequence[GenerationRun]) -> GenerationRun:
        """Runs over disjoint prompt sets (worker processes) as one."""
        totals = {f.name: sum(getattr(r, f.name) for r in runs) for f in fields(DecodingTotals)}
        totals["batch_size"] = max((r.batch_size for r in runs), default=1)
        turns = max((len(r.turn_accept_lengths) for r in runs), default=0)
        return GenerationRun(
            **totals,
            accept_lengths=[a for r in runs for a in r.accept_lengths],
            turn_accept_lengths=[
                [a for r in runs if k < len(r.turn_accept_lengths) for a in r.turn_accept_lengths[k]]
                for k in range(turns)
            ],
        )

    def stats(self, temperature: float, greedy_baseline: bool, seed: int, max_new_tokens: int) -> GenerationStats:
        """The run as a result's `generation` record (the seed only where it sampled)."""
        return GenerationStats(
            **self.totals(),
            temperature=temperature,
            lossless_checked=temperature <= 0,
            greedy_baseline=greedy_baseline,
            seed=seed if temperature > 0 else None,
            max_new_tokens=max_new_tokens,
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
    return GenerationRun(
        prompts=done,
        conversations=conversations,
        generated_tokens=tokens,
        baseline_generated_tokens=base_tokens,
        verifier_steps=steps,
        baseline_verifier_steps=base_steps,
        seconds=seconds,
        baseline_seconds=base_seconds,
        numerical_ties=ties,
        batch_size=batch_size,
        accept_lengths=accept_lengths,
        turn_accept_lengths=by_turn,
    )


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
