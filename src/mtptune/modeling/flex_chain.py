"""The chain attention pattern as one block-sparse flex-attention call per step (the fast path on CUDA).

Keys of step s are laid out as [step-0 keys (T) ; step-1 keys (T) ; ... ; step-s keys (T)]; query row t may see
key j*T + t' iff (j == 0 and t' <= t and same document) or (1 <= j and t' == t). Block sparsity skips every
fully masked 128x128 tile, so the cost is that of document-causal attention plus s thin diagonals.

The block structure depends only on the document layout, so the trainer's batch loader builds it on the host
(`host_block_masks`, a few small CPU ops per step, off the training thread) and the training thread only copies
it; `create_block_mask` on the device instead costs ~30 host-bound small kernels per step that leave the GPU idle
(docs/benchmarks.md, "Where the GPU idled").
"""

from __future__ import annotations

import copy
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BLOCK = 128  # flex attention's default sparse block size


@functools.cache
def _compiled_flex():
    # Default (automatic) dynamic shapes: packed batches change length every step; after the first recompile the
    # kernel is compiled for symbolic lengths instead of once per length.
    return torch.compile(flex_attention)


def chain_mask_mod(doc_ids: torch.Tensor):
    """mask_mod of the chain pattern over [step-0 keys ; chain keys] for document ids [B, T]."""
    T = doc_ids.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx // T
        t = kv_idx % T
        prefix = (j == 0) & (t <= q_idx) & (doc_ids[b, t] == doc_ids[b, q_idx])
        return prefix | ((j >= 1) & (t == q_idx))

    return mask_mod


def block_mask(doc_ids: torch.Tensor, step: int) -> BlockMask:
    B, T = doc_ids.shape
    # _compile: build the block mask with a compiled kernel instead of evaluating mask_mod densely in eager mode
    # (T x 3T = 200M points at T = 8192).
    return create_block_mask(chain_mask_mod(doc_ids), B, None, T, (step + 1) * T, device=doc_ids.device, _compile=True)


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, rows, cols] bool -> (blocks per row [B, 1, rows], their column indices first [B, 1, rows, cols]), in
    the order flex attention's own conversion produces (stable descending sort)."""
    counts = dense.sum(-1, dtype=torch.int32)
    indices = torch.argsort(dense.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None].contiguous(), indices[:, None].contiguous()


def host_block_masks(doc_ids: torch.Tensor, num_steps: int) -> list[BlockMask] | None:
    """The block masks of steps 0..num_steps-1 for CPU document ids [B, T] (non-decreasing along T, as packing
    makes them), built on the CPU with a placeholder mask_mod (`to_device`, then `with_doc_ids`).

    Returns None when T is not a multiple of the block size (the chain diagonals would straddle blocks; the
    device path handles that case). Tiles are classified exactly as `create_block_mask` does: full when every
    (query, key) pair is allowed, partial when some are, absent otherwise.
    """
    B, T = doc_ids.shape
    if T % BLOCK or doc_ids.device.type != "cpu":
        return None
    n = T // BLOCK
    tiles = doc_ids.reshape(B, n, BLOCK)
    first, last = tiles[..., 0], tiles[..., -1]  # smallest / largest document id of each tile
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    earlier = (k < q)[None]
    # Key tile k < query tile i: some pair shares a document iff last[k] == first[i]; all do iff first[k] == last[i].
    full = earlier & (first[:, None, :] == last[:, :, None])
    partial = (earlier & (last[:, None, :] == first[:, :, None]) & ~full) | (k == q)[None]
    diagonal = torch.eye(n, dtype=torch.bool).expand(B, n, n)
    masks = []
    for step in range(num_steps):
        dense_partial = torch.cat([partial] + [diagonal] * step, dim=-1)
        dense_full = torch.cat([full] + [torch.zeros_like(full)] * step, dim=-1)
        masks.append(
            BlockMask.from_kv_blocks(
                *_ordered(dense_partial), *_ordered(dense_full), BLOCK_SIZE=BLOCK, seq_lengths=(T, (step + 1) * T)
            )
        )
    return masks


_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
_MASK_TENSORS += ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _map_tensors(mask: BlockMask, fn) -> BlockMask:
    """A copy of the mask with `fn` applied to each of its index tensors (mask_mod and sizes kept)."""
    mapped = copy.copy(mask)
    for name in _MASK_TENSORS:
        if isinstance(tensor := getattr(mask, name, None), torch.Tensor):
            setattr(mapped, name, fn(tensor))
    return mapped


def pin_block_mask(mask: BlockMask) -> BlockMask:
    return _map_tensors(mask, torch.Tensor.pin_memory)


def to_device(mask: BlockMask, device: torch.device) -> BlockMask:
    """A host-built mask on `device` (non-blocking copies of its pinned tensors); `with_doc_ids` completes it."""
    return _map_tensors(mask, lambda t: t.to(device, non_blocking=True))


def with_doc_ids(mask: BlockMask, doc_ids: torch.Tensor) -> BlockMask:
    """The mask with the chain mask_mod over these (device) document ids, for its partial tiles."""
    complete = copy.copy(mask)
    complete.mask_mod = chain_mask_mod(doc_ids)
    return complete


def attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    doc_ids: torch.Tensor,
    step: int,
    scaling: float | None,
    mask: BlockMask | None = None,
) -> torch.Tensor:
    """query [B, h, T, d]; keys/values [B, kv_h, (step+1)*T, d] -> [B, h, T, d]. `mask`: this step's block mask
    if the caller has it (host-built), else it is built here on the device."""
    if mask is None:
        mask = block_mask(doc_ids, step)
    gqa = query.shape[1] != keys.shape[1]
    return _compiled_flex()(query, keys, values, block_mask=mask, scale=scaling, enable_gqa=gqa)
