"""The MTP head: one module for every family, numerically what vLLM's drafter computes (docs/contracts.md,
"Numerics vLLM serves").

Parameter names equal the checkpoint's `mtp.*` names without the prefix (`fc`, `pre_fc_norm_embedding`,
`pre_fc_norm_hidden`, `layers.0.*`, `norm`), so loading a head is a plain state-dict copy. The verifier's
embedding, LM head and final norm are shared, frozen, and stored as non-persistent buffers: they never receive
gradients, never appear in `state_dict()`, and are never saved or stitched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from mtptune.families.base import MtpFamily
from mtptune.modeling.chain_attention import ATTN_IMPLEMENTATION, ChainAttentionState, document_ids
from mtptune.modeling.norms import rms_norm

InputNorm = Literal["post_norm", "none"]


@dataclass(frozen=True)
class SharedWeights:
    """The verifier tensors the head shares with it."""

    embed: torch.Tensor  # [V, H]
    lm_head: torch.Tensor  # [V, H] (the same tensor as `embed` when tied)
    final_norm: torch.Tensor  # [H]


class MtpHead(nn.Module):
    def __init__(self, family: MtpFamily, text_config: PretrainedConfig, shared: SharedWeights | None = None):
        super().__init__()
        self.family = family
        self.text_config = text_config
        hidden, eps = text_config.hidden_size, text_config.rms_norm_eps
        self.eps = eps
        layer_config = _layer_config(text_config)
        self.layer_config = layer_config
        self.pre_fc_norm_embedding = family.build_norm(hidden, eps)
        self.pre_fc_norm_hidden = family.build_norm(hidden, eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([family.build_decoder_layer(layer_config)])
        self.norm = family.build_norm(hidden, eps)
        self.rotary_emb = family.build_rotary(layer_config)
        self.register_buffer("embed_tokens", torch.empty(0), persistent=False)
        self.register_buffer("lm_head", torch.empty(0), persistent=False)
        self.register_buffer("verifier_norm", torch.empty(0), persistent=False)
        if shared is not None:
            self.set_shared(shared)

    def set_shared(self, shared: SharedWeights) -> None:
        self.embed_tokens = shared.embed.detach()
        self.lm_head = shared.lm_head.detach() if shared.lm_head is not shared.embed else self.embed_tokens
        self.verifier_norm = shared.final_norm.detach()

    def _apply(self, fn, recurse=True):
        # Keep the rotary frequencies fp32 through .to(bfloat16): HF and vLLM compute angles in fp32 and cast
        # only cos/sin; bf16 inv_freq would shift long-range positions.
        # The same for the family's fp32 buffers (e.g. DeepSeek's e_score_correction_bias, fp32 on disk).
        owners = [(self.rotary_emb, n) for n in self.rotary_emb._buffers]
        if self.family.fp32_buffers:
            owners += [
                (module, n)
                for module in self.layers.modules()
                for n in module._buffers
                if n in self.family.fp32_buffers
            ]
        saved = [(m, n, m._buffers[n]) for m, n in owners if m._buffers[n] is not None and not m._buffers[n].is_meta]
        super()._apply(fn, recurse)
        for module, name, original in saved:
            module._buffers[name] = original.to(device=module._buffers[name].device)
        return self

    @property
    def hidden_size(self) -> int:
        return self.fc.out_features

    def verifier_final_norm(self, residual: torch.Tensor) -> torch.Tensor:
        """h_t = FinalNorm(r_t) with the verifier's own final-norm weight (docs/contracts.md, "Which hidden state")."""
        return rms_norm(residual, self.verifier_norm, self.eps, self.family.zero_centered_norms)

    def residual_to_inputs(self, residual: torch.Tensor, input_norm: InputNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The one step from a captured layer-N residual r_t to what the head uses: `(h_t, step-0 input)`.

        h_t = FinalNorm(r_t) is the verifier's forward output: what vLLM feeds its drafter, and the reference the
        loss's verifier-greedy tokens come from. Step 0 reads h_t ("post_norm", as served) or r_t itself ("none",
        the pre-norm A/B)."""
        post_norm = self.verifier_final_norm(residual)
        return post_norm, (post_norm if input_norm == "post_norm" else residual)

    def step(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        chain: ChainAttentionState,
    ) -> torch.Tensor:
        """One MTP step for all rows: o = N_mtp(block(fc([N_emb(E[y]); N_hid(g)]))) (order per family)."""
        emb = nn.functional.embedding(tokens, self.embed_tokens).to(hidden.dtype)
        if self.family.zero_embedding_at_position_0:
            emb = emb.masked_fill((position_ids == 0)[..., None], 0.0)
        parts = [self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(hidden)]
        if self.family.concat_order == "hidden_first":
            parts.reverse()
        x = self.fc(torch.cat(parts, dim=-1))
        if hasattr(self.rotary_emb, "mrope_section") and position_ids.dim() == 2:
            # Qwen3.5's interleaved mRoPE takes [3, B, T] ids (equal rows for text, docs/contracts.md, "Positions");
            # transformers 5.19 broadcasts [B, T] itself but 5.17 (the GPU image) indexes a third dim and fails on 2-D
            # ids.
            position_ids = position_ids[None].expand(3, *position_ids.shape)
        position_embeddings = self.rotary_emb(x, position_ids)
        x = self.layers[0](x, position_embeddings=position_embeddings, attention_mask=None, mtp_chain=chain)
        chain.step += 1
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        num_steps: int = 1,
        input_norm: InputNorm = "post_norm",
        hidden_is_pre_norm: bool = True,
        attention_backend: str = "auto",
        block_masks: list | None = None,
    ) -> list[torch.Tensor]:
        """Teacher-forced K-step unroll over whole (packed) sequences.

        input_ids [B, T], hidden_states [B, T, H] (the verifier's layer-N states of the same tokens),
        position_ids [B, T] resetting to 0 at each packed document (default: 0..T-1).
        Returns the post-`norm` outputs o^k [B, T, H] for k < num_steps; row t of step k consumed token
        x_{t+k+1} and predicts x_{t+k+2}. Rows whose inputs run past their document are garbage by
        construction and must be masked by the caller (see `step_targets`).
        attention_backend: "dense" (reference), "flex" (CUDA fast path) or "auto" (flex on CUDA).
        block_masks: flex only, the steps' block masks built on the host (`flex_chain.host_block_masks`, moved
        with `flex_chain.to_device`); None builds them here on the device.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if hidden_is_pre_norm:
            _, hidden_states = self.residual_to_inputs(hidden_states, input_norm)
        doc_ids = document_ids(position_ids)
        if block_masks is not None:
            from mtptune.modeling import flex_chain

            block_masks = [flex_chain.with_doc_ids(mask, doc_ids) for mask in block_masks]
        chain = ChainAttentionState(doc_ids=doc_ids, backend=attention_backend, block_masks=block_masks)
        outputs = []
        g = hidden_states
        for k in range(num_steps):
            tokens = shift_left(input_ids, k + 1)
            g = self.step(tokens, g, position_ids + k, chain)
            outputs.append(g)
        return outputs

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(outputs, self.lm_head.to(outputs.dtype))


def shift_left(x: torch.Tensor, n: int, fill: int = 0) -> torch.Tensor:
    """x[:, t + n] at column t; columns past the end get `fill`."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill)
    return torch.cat([x[:, n:], pad], dim=1)[:, : x.shape[1]]


def step_targets(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, position_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and validity for step k (docs/contracts.md, "Targets"): row t predicts x_{t+k+2}, valid iff that token
    exists in the same document and is supervised."""
    doc = document_ids(position_ids)
    shift = k + 2
    targets = shift_left(input_ids, shift)
    valid = shift_left(loss_mask.to(torch.bool), shift, fill=0) & (shift_left(doc, shift, fill=-1) == doc)
    return targets, valid


def _layer_config(text_config: PretrainedConfig) -> PretrainedConfig:
    import copy

    config = copy.deepcopy(text_config)
    config._attn_implementation = ATTN_IMPLEMENTATION
    config._experts_implementation = "eager"
    return config
