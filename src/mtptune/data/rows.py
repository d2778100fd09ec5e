"""Token rows as training and evaluation read them: one `Row` type and one reader of prepared data.

A prepared dataset (`mtptune prepare`, a `datasets.save_to_disk` folder) or a `.jsonl` of token rows
(`input_ids`, optional `loss_mask`) both come out as `Row`s; the trainer reads a prepared folder through
`PreparedRows` (random access, truncated to the packing budget), evaluation through `load_rows`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mtptune.data.prepare import load_prepared
from mtptune.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Row:
    """One document: its index in the data (names the hidden-state file `hs_{row_id}.safetensors`), its token ids
    and which of them are supervised (1 = completion). Lists are accepted and stored as int64 tensors."""

    row_id: int
    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] int64

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_ids", torch.as_tensor(self.input_ids, dtype=torch.int64))
        object.__setattr__(self, "loss_mask", torch.as_tensor(self.loss_mask, dtype=torch.int64))

    def __len__(self) -> int:
        return self.input_ids.numel()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Row):
            return NotImplemented
        return (
            self.row_id == other.row_id
            and torch.equal(self.input_ids, other.input_ids)
            and torch.equal(self.loss_mask, other.loss_mask)
        )


class PreparedRows:
    """Random access to a prepared dataset (`input_ids`, `loss_mask`), each row truncated to `max_len` tokens."""

    def __init__(self, data_path: str | Path, max_len: int | None = None, max_rows: int | None = None):
        self.path = Path(data_path)
        self.dataset = load_prepared(self.path)
        n = len(self.dataset) if max_rows is None else min(max_rows, len(self.dataset))
        if "seq_len" in self.dataset.column_names:
            lengths = [int(x) for x in self.dataset["seq_len"][:n]]
        else:
            lengths = [len(x) for x in self.dataset["input_ids"][:n]]
        self.max_len = max_len
        self.truncated = 0 if max_len is None else sum(1 for n_tok in lengths if n_tok > max_len)
        if self.truncated:
            log.warning(
                "%d of %d rows are longer than --total-seq-len %d and are truncated to it (their tail is not trained).",
                self.truncated,
                n,
                max_len,
            )
        self.lengths = lengths if max_len is None else [min(n_tok, max_len) for n_tok in lengths]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, row_id: int) -> Row:
        item = self.dataset[int(row_id)]
        ids = torch.as_tensor(item["input_ids"], dtype=torch.int64)[: self.max_len]
        mask = torch.as_tensor(item["loss_mask"], dtype=torch.int64)[: self.max_len]
        if ids.shape != mask.shape:
            raise DataError(f"{self.path}: row {row_id} has {ids.numel()} input_ids but {mask.numel()} loss_mask.")
        return Row(int(row_id), ids, mask)

    def __iter__(self) -> Iterator[Row]:
        return (self[i] for i in range(len(self)))


def load_rows(path: str | Path, max_rows: int | None = None) -> list[Row]:
    """Rows from a prepared dataset folder or a `.jsonl` of token rows (`input_ids` or `token_ids`, optional
    `loss_mask`: without it every token is supervised)."""
    path = Path(path)
    if path.is_dir():
        prepared = PreparedRows(path, max_rows=max_rows)
        rows = [prepared[i] for i in range(len(prepared))]
    elif path.is_file():
        rows = []
        for row in _jsonl_rows(path):
            if max_rows is not None and len(rows) >= max_rows:
                break
            rows.append(row)
    else:
        raise DataError(f"{path}: no such prepared dataset folder or jsonl file.")
    if not rows:
        raise DataError(f"{path}: holds no rows.")
    return rows


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON: {exc}") from exc
            ids = data.get("input_ids", data.get("token_ids")) if isinstance(data, dict) else None
            if ids is None:
                raise DataError(f"{where}: a token row needs `input_ids` (and optionally `loss_mask`).")
            yield _checked(lineno - 1, ids, data.get("loss_mask", [1] * len(ids)), where)


def _checked(row_id: int, ids: object, mask: object, where: str) -> Row:
    if not _int_list(ids):
        raise DataError(f"{where}: `input_ids` must be a list of integers.")
    if not _int_list(mask) or len(mask) != len(ids):  # type: ignore[arg-type]
        raise DataError(f"{where}: `loss_mask` must be a list as long as `input_ids` ({len(ids)}).")  # type: ignore[arg-type]
    return Row(row_id, ids, mask)  # type: ignore[arg-type]


def _int_list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(t, int) for t in value)
