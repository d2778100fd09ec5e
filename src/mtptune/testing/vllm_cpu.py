"""A learnable tiny Qwen3.5 that vLLM's CPU build can serve, with its training rows and held-out prompts.

    python -m mtptune.testing.vllm_cpu OUT   # OUT/verifier, OUT/train.jsonl, OUT/test_prompts.jsonl

vLLM's CPU kernels are pickier than transformers: its attention takes head_dim 32, 64, 80, 96, 112, 128, ... (not
the tiny verifiers' 16), its Gated-DeltaNet kernel linear key/value head dims of 128 (not 16 or 32), and it refuses
fp32 linear attention (bf16 weights). The trunk is hybrid like every Qwen3.5 (3 linear-attention layers + 1
full-attention layer) and trained on `learnable`'s stride-counting task, so a finetuned MTP head is really
accepted and the random native one is not. Used by tests/vllm and the README's "With vLLM" section.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from mtptune.testing.learnable import LearnableSpec, marker, train_verifier
from mtptune.testing.tiny import TinySpec, write_tiny_verifier

VLLM_CPU_TINY = TinySpec(
    family="qwen3_5",
    layout="conditional",  # the layout of the released Qwen3.5 checkpoints
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_head_dim=128,
    linear_num_key_heads=1,
    linear_num_value_heads=2,
    vocab_size=1024,
    dtype="bfloat16",
)
# Hybrid trunk (the GDN torch fallback makes this ~1-2.5 min of CPU training instead of ~20 s).
VLLM_CPU_LEARNABLE = LearnableSpec(tiny=VLLM_CPU_TINY, full_attention_trunk=False)


@dataclass(frozen=True)
class Example:
    root: Path

    @property
    def verifier(self) -> Path:
        return self.root / "verifier"

    @property
    def train_rows(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def test_prompts(self) -> Path:
        return self.root / "test_prompts.jsonl"


def split_prompts(spec: LearnableSpec, train: int, test: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """(training rows, held-out prompts): distinct (stride, start) pairs, none of the held-out ones trained on."""
    pairs = [(s, a) for s in spec.strides for a in range(spec.modulus)]
    random.Random(seed).shuffle(pairs)
    if test >= len(pairs):
        raise ValueError(f"at most {len(pairs) - 1} held-out prompts (distinct stride/start pairs)")
    held_out, pool = pairs[:test], pairs[test:]
    first = spec.prompt_len - 1
    longest = spec.max_len - 1  # the verifier was trained on documents up to max_len tokens

    def document(stride: int, start: int, length: int) -> list[int]:
        return [marker(spec, stride)] + [spec.base + (start + i * stride) % spec.modulus for i in range(length)]

    rows = [document(*pool[i % len(pool)], longest) for i in range(train)]
    prompts = [document(stride, start, first) for stride, start in held_out]
    return rows, prompts


def write_example(
    out_dir: str | Path,
    spec: LearnableSpec = VLLM_CPU_LEARNABLE,
    train_rows: int = 96,
    test_prompts: int = 16,
    max_tokens: int = 32,
) -> Example:
    """Train the verifier (CPU, 1-3 min) and write it, its training rows (token ids + loss mask: prompt 0,
    continuation 1, for `mtptune prepare`) and its held-out token-id prompts (for `mtptune evaluate`)."""
    example = Example(Path(out_dir))
    example.root.mkdir(parents=True, exist_ok=True)
    model, accuracy = train_verifier(spec)
    write_tiny_verifier(example.verifier, spec.tiny, model=model)
    rows, prompts = split_prompts(spec, train_rows, test_prompts)
    mask = [[0] * spec.prompt_len + [1] * (len(ids) - spec.prompt_len) for ids in rows]
    records = [{"input_ids": ids, "loss_mask": m} for ids, m in zip(rows, mask)]
    with example.train_rows.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with example.test_prompts.open("w") as f:
        f.writelines(json.dumps({"prompt_token_ids": p, "max_tokens": max_tokens}) + "\n" for p in prompts)
    (example.root / "verifier_accuracy.json").write_text(json.dumps({"greedy_accuracy": accuracy}) + "\n")
    return example


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-rows", type=int, default=96)
    parser.add_argument("--test-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    example = write_example(
        args.out, train_rows=args.train_rows, test_prompts=args.test_prompts, max_tokens=args.max_tokens
    )
    accuracy = json.loads((example.root / "verifier_accuracy.json").read_text())["greedy_accuracy"]
    print(f"wrote {example.verifier} (greedy accuracy {accuracy:.3f}), {example.train_rows}, {example.test_prompts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
