"""Speculative (and plain greedy) decoding of several prompts in one batch, for full-attention verifiers.

The per-prompt path (`speculative.speculative_decode`) is the reference; this one decodes B prompts with one
verifier forward per round for all of them, as a serving engine does. A small verifier on a GPU is bound by kernel
launches, so a round over B rows costs about what one row costs.

Rows reject different numbers of drafts, so the batch's KV cache cannot be cropped: every round appends K + 1 slots
to every row and the slots of rejected drafts are masked out instead (`BatchKvCache`). Each token keeps its own RoPE
position (passed per row), so the holes change nothing but the reduction order of the attention: the outputs equal
the per-prompt path's up to rounding (tests/evaluation/test_batched_decoding.py). Each prompt is prefilled alone,
exactly as the reference does, and its keys and values are then left-padded into the batch (the padding is masked).

The drafts come from `speculative.propose_drafts_batch` (the head's first pass over every row's slots at once, then
K-1 steps on each row's last slot). Acceptance follows `speculative.verify_drafts` row by row, with each prompt's own
random generator.
"""

from __future__ import annotations

import time

import torch

from mtptune.evaluation.speculative import (
    Decoded,
    GreedyMargin,
    VerifyHook,
    emitted,
    greedy_accept,
    greedy_margins,
    pick_token,
    propose_drafts_batch,
    verify_drafts,
)
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.head import MtpHead


class BatchKvCache:
    """One transformers DynamicCache for B rows that all grow by the same number of slots per forward; `valid`
    [B, slots] marks the slots a row's later tokens may attend to (its own tokens; not padding, not rejected drafts)."""

    def __init__(self, forward: VerifierForward, prompts: list[list[int]]) -> None:
        from transformers import DynamicCache

        self.forward = forward
        device = forward.device
        singles, self.prefill_hidden = [], []
        for prompt in prompts:  # alone, as the reference path prefills
            cache = DynamicCache(config=forward.model.config)
            ids = torch.tensor(prompt, device=device)[None]
            out = forward.model.model(input_ids=ids, past_key_values=cache, use_cache=True)
            singles.append(cache)
            self.prefill_hidden.append(out.last_hidden_state[0])
        width = max(len(p) for p in prompts)
        self.valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            self.valid[row, width - len(prompt) :] = True
        self.cache = DynamicCache(config=forward.model.config)
        for layer in range(len(singles[0].layers)):
            keys = [_left_pad(c.layers[layer].keys, width) for c in singles]
            values = [_left_pad(c.layers[layer].values, width) for c in singles]
            self.cache.update(torch.cat(keys), torch.cat(values), layer)

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    @torch.no_grad()
    def extend(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append [B, W] tokens at RoPE positions [B, W] (new slots slots..slots+W-1); returns their post-norm hidden
        states [B, W, H]."""
        B, W = input_ids.shape
        self.valid = torch.cat([self.valid, self.valid.new_ones(B, W)], dim=1)
        start = self.slots - W
        out = self.forward.model.model(
            input_ids=input_ids,
            attention_mask=self.valid.long(),
            past_key_values=self.cache,
            use_cache=True,
            cache_position=torch.arange(start, start + W, device=input_ids.device),
            position_ids=positions,
        )
        return out.last_hidden_state

    def reject(self, row: int, count: int) -> None:
        """Mask out the last `count` slots of `row` (its rejected drafts)."""
        if count:
            self.valid[row, self.slots - count :] = False

    def keep(self, rows: list[int]) -> None:
        """Drop every other row (finished prompts)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.valid.device)
        self.valid = self.valid[index]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index]
            layer.values = layer.values[index]


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """[1, heads, T, d] -> [1, heads, width, d] with zeros first (finite, and masked out)."""
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))


@torch.no_grad()
def decode_batch(
    verifier: VerifierForward,
    head: MtpHead | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    num_steps: int,
    temperature: float = 0.0,
    generators: list[torch.Generator | None] | None = None,
    stop_tokens: set[int] | None = None,
    verify_hook: VerifyHook | None = None,
) -> tuple[list[Decoded], list[list[GreedyMargin]]]:
    """Decode every prompt; `head=None` (num_steps 0) is plain greedy decoding with each token's margin (what
    `speculative.greedy_decode` returns), else speculative decoding as `speculative.speculative_decode`. Each
    Decoded's `seconds` is its share of the batch's wall time, so summed seconds are the batch's time."""
    if not verifier.supports_kv_rollback:
        raise ValueError("batched decoding needs a full-attention verifier (a KV cache that can mask slots)")
    stop_tokens = stop_tokens or set()
    greedy = head is None
    num_steps = 0 if greedy else num_steps
    generators = generators or [None] * len(prompts)
    start = time.perf_counter()
    device = verifier.device
    cache = BatchKvCache(verifier, prompts)
    outs = [Decoded(tokens=[], verifier_steps=1) for _ in prompts]
    margins: list[list[GreedyMargin]] = [[] for _ in prompts]
    sequences = [list(p) for p in prompts]
    hiddens = list(cache.prefill_hidden)  # the states of every token but the newest (the first new one)
    first_logits = verifier.logits(torch.stack([h[-1] for h in cache.prefill_hidden]))
    for b, token in enumerate(_first_tokens(first_logits, temperature, generators, margins if greedy else None)):
        outs[b].tokens.append(token)
        sequences[b].append(token)
    active = [b for b in range(len(prompts)) if _open(outs[b], max_new_tokens, stop_tokens)]
    cache.keep(active)
    while active:
        drafts = (
            [[] for _ in active]
            if greedy
            else propose_drafts_batch(head, [sequences[b] for b in active], [hiddens[b] for b in active], num_steps)
        )
        ids = torch.tensor([[sequences[b][-1], *d] for b, d in zip(active, drafts)], device=device)
        base = torch.tensor([len(sequences[b]) - 1 for b in active], device=device)
        hidden_new = cache.extend(ids, base[:, None] + torch.arange(num_steps + 1, device=device))
        logits = verifier.logits(hidden_new)  # [B, K+1, V]: predicts drafts 0..K-1 and the bonus
        if greedy:
            margins_now = greedy_margins(logits[:, 0])
        if verify_hook is not None:
            logits = torch.stack([verify_hook(row) for row in logits])
        # One device sync per round: the argmaxes at temperature 0, else the logits themselves (sampled on the CPU).
        rows = logits.argmax(dim=-1).tolist() if temperature <= 0 else logits.float().cpu()
        for i, b in enumerate(active):
            if temperature <= 0:
                accepted, bonus = greedy_accept(drafts[i], rows[i])
            else:
                accepted, bonus = verify_drafts(drafts[i], rows[i], temperature, generators[b])
            out = outs[b]
            out.verifier_steps += 1
            if greedy:
                margins[b].append(margins_now[i])
            else:
                out.accept_lengths.append(accepted)
                out.draft_slots.append(len(sequences[b]) - 2)
            new = emitted(drafts[i], accepted, bonus, stop_tokens)
            out.tokens.extend(new)
            sequences[b].extend(new)
            cache.reject(i, num_steps - accepted)
            if not greedy:  # the head's input next round: states of the accepted prefix (the bonus comes next)
                hiddens[b] = torch.cat([hiddens[b], hidden_new[i, : accepted + 1]])[: len(sequences[b]) - 1]
        still = [i for i, b in enumerate(active) if _open(outs[b], max_new_tokens, stop_tokens)]
        if len(still) < len(active):
            cache.keep(still)
            active = [active[i] for i in still]
    seconds = (time.perf_counter() - start) / max(1, len(prompts))
    for out, margin in zip(outs, margins):
        out.tokens = out.tokens[:max_new_tokens]
        out.seconds = seconds
        del margin[len(out.tokens) :]
    return outs, margins


def _open(out: Decoded, max_new_tokens: int, stop_tokens: set[int]) -> bool:
    return len(out.tokens) < max_new_tokens and out.tokens[-1] not in stop_tokens


def _first_tokens(
    logits: torch.Tensor,
    temperature: float,
    generators: list[torch.Generator | None],
    margins: list[list[GreedyMargin]] | None,
) -> list[int]:
    """The prefill's token per row [B, V] (the verifier alone picks it), as the reference's `pick_token`."""
    if margins is not None:
        for row, margin in zip(margins, greedy_margins(logits)):
            row.append(margin)
    if temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    return [pick_token(row, temperature, g) for row, g in zip(logits, generators)]
