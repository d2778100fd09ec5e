"""The verifier run with transformers: post-norm hidden states h_t and its own greedy tokens.

The whole forward is recomputed for every call (no KV cache): the hybrid verifiers' linear-attention state
cannot be rolled back cheaply after a rejected draft, and recomputing is always correct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mtptune.checkpoint.verifier import Verifier
from mtptune.errors import CheckpointError

# Full-vocabulary logits of a long row are large (8192 x 248k in fp32 = 8 GB): take argmaxes in row chunks.
ARGMAX_CHUNK = 1024


def greedy_tokens(hidden: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """argmax over the vocabulary of `logits_fn(hidden)` for every row of `hidden` [..., T, H] -> [..., T]."""
    parts = [logits_fn(chunk).argmax(dim=-1) for chunk in hidden.split(ARGMAX_CHUNK, dim=-2)]
    return torch.cat(parts, dim=-1)


@dataclass
class VerifierForward:
    """A transformers model of the verifier (text part only) used for direct forwards."""

    model: torch.nn.Module
    verifier: Verifier
    device: torch.device

    @classmethod
    def load(
        cls, verifier: Verifier, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
    ) -> VerifierForward:
        from transformers import AutoModelForCausalLM

        # A *ForConditionalGeneration checkpoint loads as its text *ForCausalLM; model.visual.* is dropped silently
        # (contracts f), which is what we want: evaluation is text-only.
        try:
            model = AutoModelForCausalLM.from_pretrained(verifier.root, dtype=dtype)
        except Exception as exc:
            raise CheckpointError(f"transformers cannot load verifier {verifier.root} for a forward: {exc}") from exc
        device = torch.device(device)
        return cls(model.to(device).eval(), verifier, device)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config.get_text_config(), "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] or [B, T] token ids -> post-final-norm hidden states h_t [.., T, H] (what vLLM feeds the drafter)."""
        squeeze = input_ids.dim() == 1
        ids = input_ids[None] if squeeze else input_ids
        out = self.model.model(input_ids=ids.to(self.device), use_cache=False)
        hidden = out.last_hidden_state  # already post-norm (contracts d4)
        return hidden[0] if squeeze else hidden

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The verifier's greedy next token after each position: argmax W_lm h_t."""
        return greedy_tokens(hidden, self.logits)
