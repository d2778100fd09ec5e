"""`prepare`: raw rows (token ids, conversations, presets) -> a prepared dir the trainer reads (docs/contracts.md,
"Output folders").

Output in `output` (written beside it first and moved in when complete: a failed prepare leaves no output folder
and keeps an earlier dataset): the `datasets` arrow dataset (`input_ids` int64[], `loss_mask` int64[], `seq_len`),
`token_freq.pt` (`{token_id: count}` over supervised tokens) and `report.json` (`PrepareReport`). A conversation
becomes one row with every assistant turn supervised where its rendering is prefix-stable (its prefix is processed
once, not once per turn), else one row per assistant turn (exact for every template, e.g. Qwen dropping earlier
reasoning); `one_row_per="turn"` writes every conversation per turn. `chat_rows` in the report counts both.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mtptune.data.chat_render import ChatRenderer, ChatRows, OneRowPer, is_chat_row, parse_conversation
from mtptune.data.presets import read_source
from mtptune.data.readers import SourceRow
from mtptune.data.token_rows import Dropped, TokenRow, is_token_row, truncate, validate_token_row
from mtptune.data.tokenizers import load_tokenizer
from mtptune.errors import DataError

log = logging.getLogger(__name__)

COLUMNS = ("input_ids", "loss_mask", "seq_len")
REPORT_FILE = "report.json"
TOKEN_FREQ_FILE = "token_freq.pt"
PREPARED_FILES = ("dataset_info.json", "state.json", REPORT_FILE, TOKEN_FREQ_FILE)
PROMPT_ONLY_KEYS = ("prompt", "turns", "question", "instruction")
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class PrepareReport:
    """What `prepare` did. Every source row is either turned into rows, dropped with a reason, or not used."""

    output: str
    rows_in: int  # source rows read
    rows_out: int  # rows written
    rows_not_used: int  # source rows left after --max-samples rows were written
    dropped: dict[str, int]  # reason -> count (a conversation drops as one; a turn row can drop on its own)
    drop_examples: dict[str, list[str]]  # reason -> first "file:line: detail"
    truncated: int  # written rows cut to seq_length
    formats: dict[str, int]  # "token_ids" / "chat" -> source rows of that format
    notes: dict[str, int]  # kept rows worth a warning (e.g. reasoning the template cannot show)
    # written chat rows: "conversation_rows" (each a whole conversation), "turn_rows" (each one assistant turn),
    # "conversations_split" (conversations written per turn because their rendering is not prefix-stable)
    chat_rows: dict[str, int]
    tokens_total: int
    supervised_tokens_total: int
    length_histogram: dict[str, int]  # "lo-hi" tokens -> rows
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        chat = self.chat_rows
        conversations = (
            f"; chat: {chat['conversation_rows']} conversation rows, {chat['turn_rows']} turn rows "
            f"({chat['conversations_split']} conversations not prefix-stable, written per turn)"
            if chat.get("conversation_rows") or chat.get("turn_rows")
            else ""
        )
        return (
            f"{self.rows_in} rows in -> {self.rows_out} rows out ({self.tokens_total} tokens, "
            f"{self.supervised_tokens_total} supervised); dropped: {drops}; truncated: {self.truncated}; "
            f"not used (--max-samples): {self.rows_not_used}{conversations}"
        )


@dataclass(frozen=True)
class RowResult:
    where: str
    format: str
    rows: list[TokenRow]
    dropped: list[Dropped]
    truncated: list[bool]  # per row in `rows`
    notes: dict[str, int]
    layout: str | None = None  # chat rows: "conversation" or "turn"
    split: str | None = None  # chat rows: why a conversation was written per turn although asked as one row


class RowProcessor:
    """Turns one source row into validated, truncated token rows (or drops with reasons)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        vocab_size: int | None,
        seq_length: int,
        minimum_valid_tokens: int,
        one_row_per: OneRowPer,
        model: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.minimum_valid_tokens = minimum_valid_tokens
        self.model = model
        self.renderer = ChatRenderer(tokenizer, one_row_per) if tokenizer is not None else None

    def __call__(self, src: SourceRow) -> RowResult:
        data = src.data
        notes: dict[str, int] = {}
        layout = split = None
        if is_token_row(data):
            fmt = "token_ids"
            parsed = validate_token_row(data, self.vocab_size)
            candidates: list[TokenRow] | Dropped = parsed if isinstance(parsed, Dropped) else [parsed]
        elif is_chat_row(data):
            fmt = "chat"
            rendered = self.render(data)
            if self.renderer is not None:
                notes, self.renderer.notes.counts = self.renderer.notes.counts, {}
            if isinstance(rendered, Dropped):
                candidates = rendered
            else:
                candidates, layout, split = rendered.rows, rendered.layout, rendered.split
        elif any(k in data for k in PROMPT_ONLY_KEYS):
            fmt = "prompt"
            candidates = Dropped("no_assistant_turn", "prompt-only row; write answers with `mtptune regenerate` first")
        else:
            fmt = "unknown"
            candidates = Dropped(
                "missing_field",
                f"row has none of input_ids+loss_mask, messages, conversations (keys: {sorted(data)[:8]})",
            )
        if isinstance(candidates, Dropped):
            return RowResult(src.where, fmt, [], [candidates], [], notes)
        rows: list[TokenRow] = []
        dropped: list[Dropped] = []
        truncated: list[bool] = []
        for row in candidates:
            cut = truncate(row, self.seq_length)
            supervised = cut.row.supervised_tokens
            if supervised < self.minimum_valid_tokens:
                why = f" after truncation to {self.seq_length}" if cut.truncated else ""
                reason = "no_supervised_tokens" if supervised == 0 else "too_few_supervised_tokens"
                dropped.append(Dropped(reason, f"{supervised} supervised tokens{why} (< {self.minimum_valid_tokens})"))
                continue
            truncated.append(cut.truncated)
            rows.append(cut.row)
        return RowResult(src.where, fmt, rows, dropped, truncated, notes, layout, split)

    def render(self, data: dict[str, Any]) -> ChatRows | Dropped:
        if self.renderer is None or self.tokenizer is None:
            raise DataError(
                f"--model {self.model} has no tokenizer, but the data holds conversations that must be rendered "
                "with the model's chat template; pass the verifier folder that has its tokenizer files."
            )
        if not self.tokenizer.chat_template:
            raise DataError(f"the tokenizer of --model {self.model} has no chat template; conversations need one.")
        conv = parse_conversation(data)
        if isinstance(conv, Dropped):
            return conv
        rendered = self.renderer.render(conv)
        if isinstance(rendered, Dropped):
            return rendered
        for row in rendered.rows:
            if self.vocab_size is not None and max(row.input_ids) >= self.vocab_size:
                return Dropped("id_out_of_range", f"tokenizer produced id {max(row.input_ids)} >= {self.vocab_size}")
        return rendered


def model_vocab_size(model: str, tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    """The embedding rows of the verifier (config.json, text_config for composite models), else the tokenizer's."""
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{config}: not valid JSON ({exc}).") from exc
        for section in (cfg, cfg.get("text_config") or {}):
            if isinstance(section.get("vocab_size"), int):
                return int(section["vocab_size"])
    return len(tokenizer) if tokenizer is not None else None


def existing_outputs(output: Path) -> list[Path]:
    if not output.is_dir():
        return []
    return sorted([*output.glob("*.arrow"), *(output / n for n in PREPARED_FILES if (output / n).exists())])


def claim_output(output: Path, overwrite: bool) -> None:
    """Refuse to clobber an earlier prepare unless asked (checked before any work; nothing is written or removed
    here: the old dataset stays until the new one is complete, see `publish`)."""
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file; expected a folder.")
    old = existing_outputs(output)
    if old and not overwrite:
        raise DataError(
            f"--output {output} already holds a prepared dataset ({', '.join(p.name for p in old[:4])}); "
            "pass --overwrite to replace it or choose another --output."
        )
    if old and (output / "hidden_states").exists():
        log.warning("%s holds a hidden-state cache made from the old data; delete it before training.", output)


STAGING_PREFIX = ".prepare-"


def staging_dir(output: Path) -> Path:
    """A fresh folder beside `output` (same file system, so moving out of it is a rename); folders left there by
    a prepare that was killed are removed first."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f"{STAGING_PREFIX}{output.name}.*"):
        pid = stale.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = output.parent / f"{STAGING_PREFIX}{output.name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(staging: Path, output: Path) -> None:
    """Move the complete dataset in `staging` to `output`. A new `output` is one rename. In an existing folder (which
    may hold the trainer's cache and checkpoints) the old prepared files go first, `state.json` (what makes a folder
    load as a dataset) before the rest, and the new `state.json` arrives last: an interrupted publish leaves a folder
    that `load_prepared` refuses, never a mix that looks complete."""
    if not output.exists():
        staging.rename(output)
        return
    old = existing_outputs(output)
    for path in sorted(old, key=lambda p: p.name != "state.json"):
        path.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "state.json"):
        os.replace(path, output / path.name)
    staging.rmdir()


def histogram(lengths: list[int], seq_length: int) -> dict[str, int]:
    edges = [0]
    edge = 64
    while edge < seq_length:
        edges.append(edge)
        edge *= 2
    edges.append(max(seq_length, max(lengths, default=0)))
    counts = {f"{lo + 1}-{hi}": 0 for lo, hi in itertools.pairwise(edges)}
    keys = list(counts)
    for n in lengths:
        for k, hi in enumerate(edges[1:]):
            if n <= hi:
                counts[keys[k]] += 1
                break
    return counts


_WORKER: RowProcessor | None = None


def _process_in_worker(src: SourceRow) -> RowResult:
    assert _WORKER is not None
    return _WORKER(src)


def process_rows(processor: RowProcessor, rows: list[SourceRow], num_workers: int) -> Iterator[RowResult]:
    """Results in input order; with workers, forked processes share the tokenizer already in memory."""
    global _WORKER
    if num_workers <= 1 or len(rows) < 2 * num_workers or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(processor, rows)
        return
    _WORKER = processor
    try:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            yield from pool.imap(_process_in_worker, rows, chunksize=16)
    finally:
        _WORKER = None


def read_all(data: list[str]) -> list[SourceRow]:
    rows: list[SourceRow] = []
    for name in data:
        before = len(rows)
        rows.extend(read_source(name))
        if len(rows) == before:
            log.warning("--data %s holds no rows", name)
    return rows


def prepare_dataset(
    model: str,
    data: list[str],
    output: str | Path,
    max_samples: int | None = None,
    seq_length: int = 8192,
    seed: int = 0,
    overwrite: bool = False,
    minimum_valid_tokens: int = 1,
    num_workers: int = 1,
    one_row_per: OneRowPer = "conversation",
) -> PrepareReport:
    """Read `data` (files, folders, presets), shuffle with `seed`, validate/render/truncate, keep at most
    `max_samples` rows, and write the prepared dir `output`. Raises DataError when nothing usable remains."""
    if not data:
        raise DataError("no --data given.")
    if seq_length < 1:
        raise DataError(f"--seq-length must be positive, got {seq_length}.")
    if minimum_valid_tokens < 1:
        raise DataError(f"--minimum-valid-tokens must be at least 1, got {minimum_valid_tokens}.")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max-samples must be positive, got {max_samples}.")
    output = Path(output)
    claim_output(output, overwrite)  # fail fast, before any tokenizer work
    tokenizer = load_tokenizer(model)
    vocab_size = model_vocab_size(model, tokenizer)
    if tokenizer is None and vocab_size is None:
        raise DataError(f"--model {model} has neither a tokenizer nor a config.json with vocab_size.")

    source = read_all(data)
    if not source:
        raise DataError(f"--data {' '.join(data)}: empty dataset (no rows).")
    random.Random(seed).shuffle(source)
    processor = RowProcessor(tokenizer, vocab_size, seq_length, minimum_valid_tokens, one_row_per, model)

    kept: list[TokenRow] = []
    dropped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    notes: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    chat_rows: Counter[str] = Counter({"conversation_rows": 0, "turn_rows": 0, "conversations_split": 0})
    split_examples: list[str] = []
    truncated = used = 0
    with tqdm(total=len(source), desc="prepare", unit="row") as bar:
        for result in process_rows(processor, source, num_workers):
            used += 1
            bar.update(1)
            formats[result.format] += 1
            notes.update(result.notes)
            for drop in result.dropped:
                dropped[drop.reason] += 1
                if len(examples.setdefault(drop.reason, [])) < MAX_EXAMPLES:
                    examples[drop.reason].append(f"{result.where}: {drop.detail}")
            room = None if max_samples is None else max_samples - len(kept)
            written = result.rows[:room]
            kept.extend(written)
            if result.layout is not None and written:
                chat_rows[f"{result.layout}_rows"] += len(written)
                if result.split is not None:
                    chat_rows["conversations_split"] += 1
                    if len(split_examples) < MAX_EXAMPLES:
                        split_examples.append(f"{result.where}: {result.split}")
            truncated += sum(result.truncated[:room])
            if max_samples is not None and len(kept) >= max_samples:
                break

    for reason, count in sorted(dropped.items()):
        log.warning("dropped %d row(s): %s, e.g. %s", count, reason, examples[reason][0])
    for note, count in sorted(notes.items()):
        log.warning("%d kept row(s): %s", count, note)
    if chat_rows["conversations_split"]:
        log.warning(
            "%d conversation(s) are not rendered prefix-stably by the chat template and were written one row per "
            "assistant turn (exact, but each turn re-processes the conversation's prefix), e.g. %s",
            chat_rows["conversations_split"],
            split_examples[0],
        )
    if not kept:
        detail = "; ".join(f"{r} x{c} (e.g. {examples[r][0]})" for r, c in sorted(dropped.items()))
        raise DataError(f"no usable rows in --data {' '.join(data)}: every row was dropped: {detail}")

    lengths = [len(r.input_ids) for r in kept]
    freq: Counter[int] = Counter()
    for row in kept:
        freq.update(t for t, m in zip(row.input_ids, row.loss_mask) if m)
    report = PrepareReport(
        output=str(output),
        rows_in=len(source),
        rows_out=len(kept),
        rows_not_used=len(source) - used,
        dropped=dict(dropped),
        drop_examples=examples,
        truncated=truncated,
        formats=dict(formats),
        notes=dict(notes),
        chat_rows=dict(chat_rows),
        tokens_total=sum(lengths),
        supervised_tokens_total=sum(freq.values()),
        length_histogram=histogram(lengths, seq_length),
        settings={
            "model": str(model),
            "data": list(data),
            "max_samples": max_samples,
            "seq_length": seq_length,
            "seed": seed,
            "minimum_valid_tokens": minimum_valid_tokens,
            "one_row_per": one_row_per,
            "vocab_size": vocab_size,
        },
    )
    staging = staging_dir(output)
    try:
        write_dataset(kept, staging)
        torch.save(dict(freq), staging / TOKEN_FREQ_FILE)
        (staging / REPORT_FILE).write_text(report.to_json() + "\n")
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed or interrupted prepare leaves nothing behind
        raise
    log.info("prepare: %s -> %s", report.summary(), output)
    return report


def features() -> datasets.Features:
    seq = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features(
        {
            "input_ids": seq(datasets.Value("int64")),
            "loss_mask": seq(datasets.Value("int64")),
            "seq_len": datasets.Value("int64"),
        }
    )


def write_dataset(rows: list[TokenRow], output: Path) -> None:
    table = {
        "input_ids": [r.input_ids for r in rows],
        "loss_mask": [r.loss_mask for r in rows],
        "seq_len": [len(r.input_ids) for r in rows],
    }
    datasets.Dataset.from_dict(table, features=features()).save_to_disk(str(output))


def load_prepared(path: str | Path) -> datasets.Dataset:
    """The dataset of a prepared dir, with its columns checked."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: prepared dataset folder not found; create it with `mtptune prepare`.")
    if not (path / "dataset_info.json").is_file() or not (path / "state.json").is_file():
        raise DataError(
            f"{path} is not a prepared dataset (no dataset_info.json/state.json from datasets.save_to_disk); "
            f"create it with `mtptune prepare --output {path}`."
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load the prepared dataset: {exc}") from exc
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{path} holds a DatasetDict; expected one prepared dataset.")
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: prepared dataset lacks column(s) {missing}; re-run `mtptune prepare`.")
    return ds
