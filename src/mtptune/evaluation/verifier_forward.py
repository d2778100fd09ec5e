"""The verifier run with transformers: post-norm hidden states h_t and its own greedy tokens.

`hidden_states` recomputes the whole forward (always correct). When every decoder layer is full attention (Llama,
Qwen2, DeepSeek) `supports_kv_rollback` is true and speculative decoding keeps a KV cache instead, masking out the
rejected drafts' slots (`batched_decoding.BatchKvCache`); hybrid verifiers (Qwen3.5 / Qwen3-Next: Gated DeltaNet /
linear-attention state that cannot be rolled back) keep the recompute path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mtptune.checkpoint.verifier import Verifier
from mtptune.devices import resolve_device, warn_if_slow_cpu_dtype

# Verifiers with recurrent / linear-attention layers: a masked cache would keep the rejected drafts in their state.
RECURRENT_MODEL_TYPES = frozenset(
    {"qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next", "mamba", "mamba2", "jamba"}
)

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
        from mtptune.checkpoint.verifier import load_causal_lm

        # A *ForConditionalGeneration checkpoint loads as its text *ForCausalLM; model.visual.* is dropped silently
        # (docs/contracts.md, "Verifier forwards"), which is what we want: evaluation is text-only. Families
        # transformers lacks (MiMo) supply their config.
        model = load_causal_lm(verifier.root, dtype=dtype)
        device = resolve_device(str(device))
        warn_if_slow_cpu_dtype(device, dtype, "the verifier")
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
        hidden = out.last_hidden_state  # already post-norm (docs/contracts.md, "Which hidden state")
        return hidden[0] if squeeze else hidden

    @property
    def supports_kv_rollback(self) -> bool:
        """Every layer is full attention: a KV cache cut back (or masked) to a prefix equals that prefix's forward, so
        speculative decoding can extend one cache (and batch several prompts) instead of recomputing."""
        config = self.model.config.get_text_config()
        if getattr(config, "model_type", "") in RECURRENT_MODEL_TYPES:
            return False
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            return False
        return not getattr(config, "sliding_window", None) or not getattr(config, "use_sliding_window", True)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The verifier's greedy next token after each position: argmax W_lm h_t."""
        return greedy_tokens(hidden, self.logits)
