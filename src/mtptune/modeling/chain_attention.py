"""The attention pattern of vLLM's MTP drafter, for teacher-forced training over whole sequences.

At serving time (docs/contracts.md, "Attention pattern") the drafter's first pass writes step-0 entries for every prefix
slot t (token x_{t+1}, hidden h_t, RoPE position t) into the head's KV cache; step k >= 1 of the draft for slot t runs
one token at position t+k whose query attends to the step-0 entries of slots <= t plus its own chain (steps 1..k of slot
t). We reproduce exactly that for every row at once: step k's keys are [step-0 keys of rows <= t in the same document] +
[step-j keys of row t, j = 1..k].

Registered with transformers' AttentionInterface as "mtptune_chain"; the decoder layer passes our
`ChainAttentionState` through its **kwargs, so the stock HF layer (q/k norms, gating, GQA) is reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "mtptune_chain"


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document index per token for packed rows: a new document starts wherever the position resets to 0."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


@dataclass
class ChainAttentionState:
    """Per-forward state: document ids and the K/V written by earlier steps (kept in the autograd graph).

    backend "dense" materialises masks and scores (exact reference; CPU and short sequences); "flex" runs one
    block-sparse flex-attention kernel per step over [step-0 keys ; chain keys] (CUDA; compiled once).
    """

    doc_ids: torch.Tensor  # [B, T]
    backend: str = "auto"
    step: int = 0
    block_masks: list | None = None  # flex: per-step BlockMasks built on the host (else built per step on device)
    keys: list[torch.Tensor] = field(default_factory=list)  # per step [B, kv_heads, T, d]
    values: list[torch.Tensor] = field(default_factory=list)
    _mask_cache: dict[int, torch.Tensor] = field(default_factory=dict)

    def prefix_mask(self) -> torch.Tensor:
        """[B, 1, T, T] bool: row t may see step-0 row t' iff t' <= t and same document."""
        if 0 not in self._mask_cache:
            T = self.doc_ids.shape[-1]
            causal = torch.ones(T, T, dtype=torch.bool, device=self.doc_ids.device).tril()
            same_doc = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
            self._mask_cache[0] = (causal[None] & same_doc)[:, None]
        return self._mask_cache[0]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def chain_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    mtp_chain: ChainAttentionState | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if mtp_chain is None:
        raise RuntimeError("mtptune_chain attention needs the `mtp_chain` state; use MtpHead.forward.")
    backend = mtp_chain.backend
    if backend == "auto":
        backend = "flex" if query.is_cuda else "dense"
    if backend == "flex":
        return _flex_forward(query, key, value, scaling, mtp_chain)
    groups = query.shape[1] // key.shape[1]
    mtp_chain.keys.append(key)
    mtp_chain.values.append(value)
    k0 = _repeat_kv(mtp_chain.keys[0], groups)
    v0 = _repeat_kv(mtp_chain.values[0], groups)
    prefix_mask = mtp_chain.prefix_mask()
    if mtp_chain.step == 0:
        out = F.scaled_dot_product_attention(query, k0, v0, attn_mask=prefix_mask, scale=scaling)
    else:
        # Scores against the step-0 prefix, plus one diagonal score per chain step j = 1..k (row t with itself).
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q32 = query.float()
        prefix_scores = torch.matmul(q32, k0.float().transpose(-1, -2)) * scale
        prefix_scores = prefix_scores.masked_fill(~prefix_mask, float("-inf"))
        chain_k = [_repeat_kv(k, groups).float() for k in mtp_chain.keys[1:]]
        chain_v = [_repeat_kv(v, groups).float() for v in mtp_chain.values[1:]]
        chain_scores = torch.stack([(q32 * k).sum(-1) * scale for k in chain_k], dim=-1)  # [B, h, T, k]
        probs = torch.softmax(torch.cat([prefix_scores, chain_scores], dim=-1), dim=-1)
        T = prefix_scores.shape[-1]
        out = torch.matmul(probs[..., :T], v0.float())
        for j, v in enumerate(chain_v):
            out = out + probs[..., T + j, None] * v
        out = out.to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _flex_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, chain: ChainAttentionState
) -> tuple[torch.Tensor, None]:
    from mtptune.modeling import flex_chain

    chain.keys.append(key)
    chain.values.append(value)
    keys = torch.cat(chain.keys, dim=2) if chain.step else key
    values = torch.cat(chain.values, dim=2) if chain.step else value
    mask = chain.block_masks[chain.step] if chain.block_masks else None
    out = flex_chain.attention(query, keys, values, chain.doc_ids, chain.step, scaling, mask)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, chain_attention_forward)
