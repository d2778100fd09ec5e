"""`mtptune prepare`: token-id rows, conversations or presets -> a prepared dataset dir (docs/contracts.md,
"Output folders")."""

from __future__ import annotations

import argparse


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of speculators' `prepare_data` (shared with scripts/prepare_data.py)."""
    parser.add_argument(
        "--model",
        required=True,
        help="verifier/tokenizer folder, a .gguf file, a cached hub id, or `smollm2` / `qwen3.5` (offline "
        "tokenizers). A folder without tokenizer files still works for token-id rows (vocab_size from config.json)",
    )
    parser.add_argument(
        "--data",
        required=True,
        action="append",
        help="repeatable: .jsonl/.json file, folder of them, or preset (gsm8k, mt_bench, sharegpt, sharegpt_dummy)",
    )
    parser.add_argument("--output", default="./output", help="prepared dataset folder (default ./output)")
    parser.add_argument("--max-samples", type=int, default=None, help="rows kept after shuffle (default all)")
    parser.add_argument("--seq-length", type=int, default=8192, help="truncation length (default 8192)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared dataset already in --output")
    parser.add_argument(
        "--minimum-valid-tokens", type=int, default=1, help="drop rows with fewer supervised tokens (default 1)"
    )
    parser.add_argument(
        "--num-workers",
        "--num-preprocessing-workers",
        dest="num_workers",
        type=int,
        default=1,
        help="processes for tokenising conversations (default 1)",
    )
    parser.add_argument(
        "--one-row-per",
        choices=("conversation", "turn"),
        default="conversation",
        help="conversations: one row per conversation with every assistant turn supervised (default; its prefix is "
        "processed once), falling back to one row per assistant turn for a conversation the chat template does not "
        "render prefix-stably (e.g. one that drops earlier reasoning), counted in report.json chat_rows; or one "
        "row per assistant turn for every conversation",
    )


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prepare",
        help="tokenize training data (token-id rows, chat conversations, presets) into a prepared dataset",
        description="Validate token-id rows or render conversations with the model's chat template (loss mask = "
        "assistant tokens incl. end of turn), truncate, and save a datasets folder + token_freq.pt + report.json.",
    )
    add_prepare_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtptune.data.prepare import prepare_dataset

    report = prepare_dataset(
        model=args.model,
        data=args.data,
        output=args.output,
        max_samples=args.max_samples,
        seq_length=args.seq_length,
        seed=args.seed,
        overwrite=args.overwrite,
        minimum_valid_tokens=args.minimum_valid_tokens,
        num_workers=args.num_workers,
        one_row_per=args.one_row_per,
    )
    print(report.summary())
    print(f"wrote {report.output} (report: {report.output}/report.json)")
    return 0
