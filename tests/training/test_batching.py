"""Packing, the contiguous validation split, per-rank sharding."""

from __future__ import annotations

import logging

import torch

from mtptune.data.rows import PreparedRows
from mtptune.testing.learnable import write_prepared_rows
from mtptune.training.batching import collate, pack_rows, plan_epoch, split_train_val


def test_split_is_a_contiguous_tail():
    train, val = split_train_val(10, 0.8)
    assert train == list(range(8)) and val == [8, 9]
    assert split_train_val(10, 1.0) == (list(range(10)), [])


def test_packing_respects_the_budget_and_is_deterministic_per_seed_and_epoch():
    lengths = [5, 9, 3, 7, 7, 2, 10, 4]
    ids = list(range(len(lengths)))
    a = pack_rows(ids, lengths, 12, seed=0, epoch=0)
    assert a == pack_rows(ids, lengths, 12, seed=0, epoch=0)
    assert a != pack_rows(ids, lengths, 12, seed=0, epoch=1)
    assert sorted(i for batch in a for i in batch) == ids  # every row exactly once
    assert all(sum(lengths[i] for i in batch) <= 12 for batch in a)
    assert pack_rows(ids, lengths, 12, seed=None, epoch=3)[0][0] == 0  # unshuffled: in order


def test_first_fit_packing_fills_budgets_better_than_next_fit():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(300, 1501, (300,), generator=gen).tolist()  # the 8.1 benchmark's row lengths
    batches = pack_rows(list(range(300)), lengths, 8192, seed=0, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    assert all(sum(lengths[i] for i in batch) <= 8192 for batch in batches)
    fill = sum(lengths) / (len(batches) * 8192)
    next_fit, used = 1, 0  # what next-fit packing (the previous packer) needs for the same rows
    for n in lengths:
        if used + n > 8192:
            next_fit, used = next_fit + 1, 0
        used += n
    assert fill > 0.95 and len(batches) < next_fit, (fill, len(batches), next_fit)


def test_one_rank_with_accumulation_sees_the_global_batch_of_two_ranks():
    batches = [[i] for i in range(7)]
    single = plan_epoch(batches, rank=0, world_size=1, grad_accum=2).steps
    r0 = plan_epoch(batches, rank=0, world_size=2, grad_accum=1).steps
    r1 = plan_epoch(batches, rank=1, world_size=2, grad_accum=1).steps
    assert len(single) == len(r0) == len(r1) == 4
    for g in range(4):
        assert sorted(i for micro in single[g] for i in micro) == sorted(r0[g][0] + r1[g][0])
    assert r1[-1] == [[]]  # the odd micro-batch out: rank 1 joins the step with an empty one


def test_long_rows_are_truncated_and_counted(tmp_path, caplog):
    rows = [{"input_ids": list(range(20)), "loss_mask": [1] * 20}, {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}]
    write_prepared_rows(rows, tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        prepared = PreparedRows(tmp_path / "data", max_len=8)
    assert prepared.truncated == 1 and "truncated" in caplog.text
    assert prepared.lengths == [8, 3] and prepared[0].input_ids.tolist() == list(range(8))


def test_collate_resets_positions_per_document(tmp_path):
    rows = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [1, 1]}]
    write_prepared_rows(rows, tmp_path / "data")
    prepared = PreparedRows(tmp_path / "data", max_len=16)
    import torch

    batch = collate([prepared[0], prepared[1]], [torch.zeros(3, 4), torch.ones(2, 4)])
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]] and batch.hidden_states.shape == (1, 5, 4)


def test_padding_is_a_separate_unsupervised_document(tmp_path):
    import torch

    from mtptune.data.rows import Row

    row = Row(0, torch.tensor([5, 6, 7]), torch.tensor([0, 1, 1]))
    batch = collate([row], [torch.ones(3, 4)], pad_to=6)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0, 0, 0]] and batch.hidden_states[0, 3:].abs().sum() == 0
