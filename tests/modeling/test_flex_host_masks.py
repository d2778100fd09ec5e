"""Flex attention's block masks built on the host equal the ones `create_block_mask` builds from the mask_mod."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from mtptune.modeling import flex_chain
from mtptune.modeling.chain_attention import document_ids
from mtptune.training.batching import PackedBatch

TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
TENSORS += ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def packed_positions(lengths: list[int], total: int) -> torch.Tensor:
    """Position ids of documents packed into `total` tokens; the tail is one padding document."""
    pos = torch.cat([torch.arange(n) for n in lengths])[:total]
    if len(pos) < total:
        pos = torch.cat([pos, torch.arange(total - len(pos))])
    return pos[None]


@pytest.mark.parametrize(
    "lengths",
    [[300, 500, 224], [1024], [1, 127, 128, 129, 639], [10] * 102 + [4], [128] * 8, [900]],
    ids=["three", "one", "block-edges", "many-short", "aligned", "padded-tail"],
)
def test_host_block_masks_equal_create_block_mask(lengths: list[int]) -> None:
    doc_ids = document_ids(packed_positions(lengths, 1024))
    masks = flex_chain.host_block_masks(doc_ids, 3)
    assert masks is not None and len(masks) == 3
    for step, mask in enumerate(masks):
        reference = create_block_mask(flex_chain.chain_mask_mod(doc_ids), 1, None, 1024, (step + 1) * 1024, "cpu")
        assert mask.seq_lengths == reference.seq_lengths
        for name in TENSORS:
            assert torch.equal(getattr(mask, name), getattr(reference, name)), (step, name)


def test_unaligned_length_falls_back_to_the_device_path() -> None:
    assert flex_chain.host_block_masks(document_ids(packed_positions([100, 50], 150)), 2) is None


def test_packed_batch_carries_pinnable_masks_with_the_chain_mask_mod() -> None:
    positions = packed_positions([200, 56], 256)
    batch = PackedBatch((0, 1), positions * 0, positions * 0, positions, torch.zeros(1, 256, 4))
    with_masks = batch.with_block_masks(2)
    assert with_masks.block_masks is not None and len(with_masks.block_masks) == 2
    moved = with_masks.to(torch.device("cpu"), torch.float32)
    doc_ids = document_ids(positions)
    mask = flex_chain.with_doc_ids(moved.block_masks[1], doc_ids)
    dense = mask.to_dense()
    reference = create_block_mask(flex_chain.chain_mask_mod(doc_ids), 1, None, 256, 512, "cpu").to_dense()
    assert torch.equal(dense, reference)
    q, kv = torch.meshgrid(torch.arange(256), torch.arange(512), indexing="ij")
    allowed = mask.mask_mod(torch.tensor(0), torch.tensor(0), q, kv)
    assert bool(allowed[210, 205]) and not bool(allowed[210, 150]) and bool(allowed[3, 256 + 3])
