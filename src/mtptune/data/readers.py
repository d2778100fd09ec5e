"""Reading raw rows from `.jsonl` / `.json` files and folders, each row tagged with the file and line it came from.

A file that is not valid UTF-8 or not valid JSON is a hard error naming the file and line: a half-read file would
silently bias the data. A UTF-8 byte-order mark at the start of a file is allowed. Row *contents* are judged later
(token_rows / chat_render), where a bad row is dropped and counted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtptune.errors import DataError

log = logging.getLogger(__name__)
DATA_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class SourceRow:
    """One raw row and where it came from (`where` = `file:line` or `preset:index`)."""

    where: str
    data: dict[str, Any]


def not_utf8(path: Path, line: int, column: int, byte: int) -> DataError:
    return DataError(
        f"{path}:{line}: not valid UTF-8 (byte 0x{byte:02x} at byte {column} of the line); data files must be "
        "UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT` if it is Latin-1."
    )


def decode_utf8(raw: bytes, path: Path, first_line: int = 1) -> str:
    """`raw` as text; DataError naming the file and line of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = first_line + raw.count(b"\n", 0, exc.start)
        raise not_utf8(path, line, exc.start - line_start + 1, raw[exc.start]) from None


def read_jsonl(path: Path) -> Iterator[SourceRow]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_utf8(raw, path, lineno)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line of a .jsonl file must be one JSON object."
                ) from exc
            yield SourceRow(f"{path}:{lineno}", as_object(data, f"{path}:{lineno}"))


def read_json(path: Path) -> Iterator[SourceRow]:
    """A `.json` file holding a list of row objects (or one object). Rows are tagged with their start line."""
    text = decode_utf8(path.read_bytes(), path).removeprefix("\ufeff")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") from exc
    if isinstance(data, dict):
        yield SourceRow(f"{path}:1", data)
        return
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of row objects, got {type(data).__name__}.")
    # Recover each element's line with a raw_decode walk so errors can point at the row in the file.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    for item in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        line = text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)
        yield SourceRow(f"{path}:{line}", as_object(item, f"{path}:{line}"))


def read_truncated_json_list(path: Path, name: str) -> Iterator[SourceRow]:
    """The complete elements of a JSON list whose file is cut off before its end (the packaged ShareGPT file stops
    mid-conversation, so `json.load` fails): decoded one element at a time until the cut, which is warned about.
    Rows are tagged `name:index`."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":  # not just a character cut in half by the truncation
            raise not_utf8(
                path, raw.count(b"\n", 0, exc.start) + 1, exc.start - raw.rfind(b"\n", 0, exc.start), raw[exc.start]
            ) from None
        text = raw[: exc.start].decode("utf-8")
    start = text.find("[")
    if start < 0:
        raise DataError(f"{path}:1: expected a JSON list of row objects.")
    decoder = json.JSONDecoder()
    pos, index = start + 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            line = text.count("\n", 0, pos) + 1
            log.warning(
                "%s: the file ends inside element %d (line %d); the %d complete ones are used", path, index, line, index
            )
            return
        yield SourceRow(f"{name}:{index}", as_object(item, f"{path} element {index}"))
        index += 1


def as_object(data: Any, where: str) -> dict[str, Any]:
    if isinstance(data, dict):
        return data
    if isinstance(data, str):
        return {"prompt": data}  # a bare string line is a prompt
    raise DataError(f"{where}: expected a JSON object per row, got {type(data).__name__}.")


def data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .json.")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no .jsonl or .json files.")
        return files
    raise DataError(f"--data {path}: no such file or folder (and not a preset name).")


def read_path(path: str | Path) -> Iterator[SourceRow]:
    for file in data_files(Path(path).expanduser()):
        yield from read_jsonl(file) if file.suffix == ".jsonl" else read_json(file)
