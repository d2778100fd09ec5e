"""The chain attention pattern as one block-sparse flex-attention call per step (the fast path on CUDA).

Keys of step s are laid out as [step-0 keys (T) ; step-1 keys (T) ; ... ; step-s keys (T)]; query row t may see
key j*T + t' iff (j == 0 and t' <= t and same document) or (1 <= j and t' == t). Block sparsity skips every
fully masked 128x128 tile, so the cost is that of document-causal attention plus s thin diagonals.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


@functools.cache
def _compiled_flex():
    # Default (automatic) dynamic shapes: packed batches change length every step; after the first recompile the
    # kernel is compiled for symbolic lengths instead of once per length.
    return torch.compile(flex_attention)


def block_mask(doc_ids: torch.Tensor, step: int) -> BlockMask:
    B, T = doc_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx // T
        t = kv_idx % T
        prefix = (j == 0) & (t <= q_idx) & (doc_ids[b, t] == doc_ids[b, q_idx])
        return prefix | ((j >= 1) & (t == q_idx))

    # _compile: build the block mask with a compiled kernel instead of evaluating mask_mod densely in eager mode
    # (T x 3T = 200M points at T = 8192).
    return create_block_mask(mask_mod, B, None, T, (step + 1) * T, device=doc_ids.device, _compile=True)


def attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    doc_ids: torch.Tensor,
    step: int,
    scaling: float | None,
) -> torch.Tensor:
    """query [B, h, T, d]; keys/values [B, kv_h, (step+1)*T, d] -> [B, h, T, d]."""
    mask = block_mask(doc_ids, step)
    gqa = query.shape[1] != keys.shape[1]
    return _compiled_flex()(query, keys, values, block_mask=mask, scale=scaling, enable_gqa=gqa)
