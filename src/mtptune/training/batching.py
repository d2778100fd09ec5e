"""From prepared rows to packed micro-batches.

A micro-batch is a list of rows packed into one `[1, total_len]` sequence (total_len <= --total-seq-len) whose
`position_ids` restart at 0 for every document, which the head turns into document-local attention. The plan
is a pure function of (row lengths, seed, epoch), so every rank computes the same plan and a resumed run
rebuilds exactly the batches it had left.

Global step g consumes micro-batches [g*W*A, (g+1)*W*A) (W ranks, A accumulation steps); rank r takes those at
index j*W + r. One rank with A=2 therefore sees the same global batch as two ranks with A=1.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from mtptune.data.rows import Row
from mtptune.modeling import flex_chain
from mtptune.modeling.chain_attention import document_ids
from mtptune.training.loss_plan import LossPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedBatch:
    row_ids: tuple[int, ...]
    input_ids: torch.Tensor  # [1, L]
    loss_mask: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L], 0 at each document start
    hidden_states: torch.Tensor  # [1, L, H] the verifier's layer-N (pre-norm) states
    real_tokens: int | None = None  # tokens of real rows (L minus any padding document); None: all of L
    plan: LossPlan | None = None  # the supervised rows per step, worked out on the host
    block_masks: tuple | None = None  # flex attention's per-step BlockMasks, built on the host (CUDA only)

    def to(self, device: torch.device, dtype: torch.dtype) -> PackedBatch:
        """Copy to `device` without blocking the host (the loader pinned the tensors)."""
        non_blocking = device.type == "cuda"

        def move(t: torch.Tensor, to_dtype: torch.dtype | None = None) -> torch.Tensor:
            return t.to(device, to_dtype, non_blocking=non_blocking)

        return PackedBatch(
            self.row_ids,
            move(self.input_ids),
            move(self.loss_mask),
            move(self.position_ids),
            move(self.hidden_states, dtype),
            self.real_tokens,
            None if self.plan is None else self.plan.to(device, non_blocking),
            None if self.block_masks is None else tuple(flex_chain.to_device(m, device) for m in self.block_masks),
        )

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(
            self.row_ids,
            self.input_ids.pin_memory(),
            self.loss_mask.pin_memory(),
            self.position_ids.pin_memory(),
            self.hidden_states if self.hidden_states.is_cuda else self.hidden_states.pin_memory(),
            self.real_tokens,
            None if self.plan is None else self.plan.pin_memory(),
            None if self.block_masks is None else tuple(flex_chain.pin_block_mask(m) for m in self.block_masks),
        )

    def with_block_masks(self, num_steps: int) -> PackedBatch:
        """With the flex-attention block masks of steps 0..num_steps-1 (unchanged if T is not block-aligned)."""
        masks = flex_chain.host_block_masks(document_ids(self.position_ids), num_steps)
        return self if masks is None else dataclasses.replace(self, block_masks=tuple(masks))

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens: what throughput is counted in."""
        return self.input_ids.shape[1] if self.real_tokens is None else self.real_tokens


def split_train_val(num_rows: int, train_data_ratio: float) -> tuple[list[int], list[int]]:
    """Contiguous split: the first ceil(ratio * n) rows train, the tail validates (never shuffled across)."""
    n_train = num_rows if train_data_ratio >= 1.0 else min(num_rows, max(1, round(num_rows * train_data_ratio)))
    return list(range(n_train)), list(range(n_train, num_rows))


OPEN_BINS = 8  # micro-batches still accepting rows while packing
PACKING = f"first-fit-{OPEN_BINS}"  # recorded in checkpoints: a mid-epoch resume needs the same plan


def pack_rows(
    row_ids: list[int], lengths: list[int], total_seq_len: int, seed: int | None, epoch: int
) -> list[list[int]]:
    """Shuffle (when seed is given) deterministically per (seed, epoch), then pack into budgets first-fit over the
    last `OPEN_BINS` micro-batches (the fullest closes when one more is needed), returned in the order they were
    opened. Rows keep their shuffled order up to that window; micro-batches fill better than with next-fit (fewer
    padded steps per epoch; docs/benchmarks.md, "Trainer step")."""
    order = list(row_ids)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = [order[i] for i in torch.randperm(len(order), generator=gen).tolist()]
    bins: list[list[int]] = []  # every micro-batch, in opening order
    used: list[int] = []
    open_bins: list[int] = []  # indices into bins
    for row_id in order:
        n = lengths[row_id]
        target = next((b for b in open_bins if used[b] + n <= total_seq_len), None)
        if target is None:
            if len(open_bins) == OPEN_BINS:
                open_bins.remove(max(open_bins, key=lambda b: used[b]))
            target = len(bins)
            bins.append([])
            used.append(0)
            open_bins.append(target)
        bins[target].append(row_id)
        used[target] += n
    return bins


@dataclass(frozen=True)
class EpochPlan:
    """The micro-batches this rank runs, grouped per global (optimizer) step."""

    steps: list[list[list[int]]]  # steps[g][j] = row ids of micro-batch j of global step g (may be empty)

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def plan_epoch(batches: list[list[int]], rank: int, world_size: int, grad_accum: int) -> EpochPlan:
    per_step = world_size * grad_accum
    num_steps = -(-len(batches) // per_step) if batches else 0
    steps = []
    for g in range(num_steps):
        group = batches[g * per_step : (g + 1) * per_step]
        # A rank without a micro-batch in the last step gets an empty one: it still joins the all-reduces.
        steps.append(
            [group[j * world_size + rank] if j * world_size + rank < len(group) else [] for j in range(grad_accum)]
        )
    return EpochPlan(steps)


def collate(
    rows: list[Row], hidden: list[torch.Tensor], pad_to: int | None = None, num_steps: int | None = None
) -> PackedBatch:
    """Concatenate rows (and their [T, H] hidden states) into one packed sequence with position resets;
    with `num_steps`, also the batch's `LossPlan` for that many MTP steps.

    `pad_to` appends a padding document (its own position reset, loss mask 0, zero states) up to that length, so
    every micro-batch has the same shape (static shapes for compiled attention kernels on GPU). No real token can
    attend to it (it comes last and is a separate document) and it is never supervised.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    # States already on a GPU (colocated, or from a GPU memory cache) are packed there; a mix goes to the GPU.
    device = next((h.device for h in hidden if h.is_cuda), hidden[0].device)
    hidden = [h.to(device) for h in hidden]
    input_ids = [r.input_ids for r in rows]
    loss_mask = [r.loss_mask for r in rows]
    positions = [torch.arange(r.input_ids.numel()) for r in rows]
    total = sum(r.input_ids.numel() for r in rows)
    if pad_to is not None and pad_to > total:
        n = pad_to - total
        input_ids.append(torch.zeros(n, dtype=torch.int64))
        loss_mask.append(torch.zeros(n, dtype=torch.int64))
        positions.append(torch.arange(n))
        hidden = [*hidden, hidden[0].new_zeros(n, hidden[0].shape[-1])]
    ids, mask, pos = torch.cat(input_ids)[None], torch.cat(loss_mask)[None], torch.cat(positions)[None]
    return PackedBatch(
        row_ids=tuple(r.row_id for r in rows),
        input_ids=ids,
        loss_mask=mask,
        position_ids=pos,
        hidden_states=torch.cat(hidden)[None],
        real_tokens=total,
        plan=None if num_steps is None else LossPlan.build(ids, mask, pos, num_steps),
    )
