"""Token rows for teacher-forced evaluation: a prepared dataset folder (contracts a7) or a jsonl of token rows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mtptune.errors import DataError


@dataclass(frozen=True)
class EvalRow:
    """One document: token ids and which of them are supervised (1 = completion)."""

    row_id: int
    input_ids: list[int]
    loss_mask: list[int]


def load_eval_rows(path: str | Path, max_rows: int | None = None) -> list[EvalRow]:
    """Rows from a `datasets.save_to_disk` folder (`input_ids`, `loss_mask`) or a `.jsonl` of such rows.

    A jsonl row may omit `loss_mask` (then every token is supervised); `token_ids` is accepted for `input_ids`.
    """
    path = Path(path)
    if path.is_dir():
        rows = _prepared_rows(path)
    elif path.is_file():
        rows = _jsonl_rows(path)
    else:
        raise DataError(f"{path}: no such prepared dataset folder or jsonl file.")
    out = []
    for row in rows:
        if max_rows is not None and len(out) >= max_rows:
            break
        out.append(row)
    if not out:
        raise DataError(f"{path}: holds no rows.")
    return out


def _prepared_rows(path: Path) -> Iterator[EvalRow]:
    try:
        from mtptune.data.prepare import load_prepared  # type: ignore[attr-defined]
    except ImportError:  # the data stage may not provide it; the on-disk format is plain datasets
        from datasets import load_from_disk as load_prepared
    try:
        dataset = load_prepared(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a prepared dataset folder (datasets.load_from_disk failed: {exc}).") from exc
    missing = {"input_ids", "loss_mask"} - set(dataset.column_names)
    if missing:
        raise DataError(f"{path}: prepared dataset lacks column(s) {sorted(missing)}; re-run `mtptune prepare`.")
    for i, row in enumerate(dataset):
        yield _checked(i, row["input_ids"], row["loss_mask"], f"{path} row {i}")


def _jsonl_rows(path: Path) -> Iterator[EvalRow]:
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


def _checked(row_id: int, ids: object, mask: object, where: str) -> EvalRow:
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise DataError(f"{where}: `input_ids` must be a list of integers.")
    if not isinstance(mask, list) or len(mask) != len(ids):
        raise DataError(f"{where}: `loss_mask` must be a list as long as `input_ids` ({len(ids)}).")
    return EvalRow(row_id, [int(t) for t in ids], [int(m) for m in mask])
