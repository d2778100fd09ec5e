"""Format (a): rows that already hold token ids (`input_ids` + `loss_mask`, 0 = prompt, 1 = supervised).

The tutorial data (`inference-optimization/Qwen3.5-9B-responses`) is this format: the target model wrote the
responses, so the ids pass through untouched; we only validate and truncate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenRow:
    input_ids: list[int]
    loss_mask: list[int]

    @property
    def supervised_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True)
class Dropped:
    """Why a row was not kept; `reason` is a stable snake_case key used in the report."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Truncation:
    row: TokenRow
    truncated: bool


def is_token_row(data: dict[str, Any]) -> bool:
    return "input_ids" in data


def _int_list(value: Any) -> list[int] | None:
    if not isinstance(value, list):
        return None
    out: list[int] = []
    for v in value:
        # bool is an int subclass; accept it only for masks (checked by the caller), reject floats and strings.
        if isinstance(v, bool) or not isinstance(v, int):
            return None
        out.append(v)
    return out


def validate_token_row(data: dict[str, Any], vocab_size: int | None) -> TokenRow | Dropped:
    """Check one format-(a) row: int ids in [0, vocab_size), a 0/1 mask of the same length."""
    if "loss_mask" not in data:
        return Dropped("missing_field", "row has input_ids but no loss_mask")
    ids = _int_list(data["input_ids"])
    if ids is None:
        return Dropped("bad_type", "input_ids must be a list of integers")
    raw_mask = data["loss_mask"]
    if isinstance(raw_mask, list):
        raw_mask = [int(v) if isinstance(v, bool) else v for v in raw_mask]
    mask = _int_list(raw_mask)
    if mask is None or any(v not in (0, 1) for v in mask):
        return Dropped("bad_loss_mask", "loss_mask must be a list of 0/1 values")
    if len(ids) != len(mask):
        return Dropped("length_mismatch", f"input_ids has {len(ids)} tokens but loss_mask has {len(mask)}")
    if not ids:
        return Dropped("empty_row", "input_ids is empty")
    low, high = min(ids), max(ids)
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        return Dropped("id_out_of_range", f"token id {bad} outside [0, {vocab_size}) of the model's vocabulary")
    return TokenRow(ids, mask)


def truncate(row: TokenRow, seq_length: int) -> Truncation:
    if len(row.input_ids) <= seq_length:
        return Truncation(row, False)
    return Truncation(TokenRow(row.input_ids[:seq_length], row.loss_mask[:seq_length]), True)
