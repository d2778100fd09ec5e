"""`mtptune regenerate`: have the target model (vLLM or `mtptune serve`) write the answers, as token-id rows."""

from __future__ import annotations

import argparse
import json

from mtptune.data.regenerate_config import DEFAULT_SAMPLING as _S
from mtptune.data.regenerate_config import ClientConfig
from mtptune.errors import ConfigError

_C = ClientConfig()


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "regenerate",
        help="regenerate assistant turns with the target model through an OpenAI-compatible endpoint",
        description="Send each conversation's user turns (or prompts / presets, e.g. sharegpt's human/gpt "
        "conversations) to /v1/chat/completions, feeding the model its own earlier answers (empty user messages are "
        "left out with their answer; a turn over the server's context ends the conversation), and token-id prompts (prompt_ids / prompt_token_ids rows, or input_ids "
        "+ loss_mask rows whose masked-out prefix is the prompt) to /v1/completions; write token-id rows "
        "(input_ids, loss_mask) from the ids the server returns. Re-running resumes: rows already in --output are "
        "skipped. "
        "Then: mtptune prepare --model M --data OUTPUT.jsonl",
    )
    parser.add_argument("--data", required=True, action="append", help="repeatable: .jsonl/.json file, folder, preset")
    parser.add_argument("--output", required=True, help="output .jsonl (appended to; resumed)")
    parser.add_argument("--endpoint", default=_C.endpoint, help="OpenAI base URL (default %(default)s)")
    parser.add_argument("--served-model", default=None, help="model id to request (default: first of GET /models)")
    parser.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    parser.add_argument("--temperature", type=float, default=_S.temperature)
    parser.add_argument("--top-p", type=float, default=_S.top_p)
    parser.add_argument(
        "--max-tokens", type=int, default=_S.max_tokens, help="per assistant turn (a row's own max_tokens overrides it)"
    )
    parser.add_argument("--seed", type=int, default=None, help="sampling seed sent to the server")
    parser.add_argument(
        "--chat-template-kwargs", default=None, help="JSON passed to the server, e.g. '{\"enable_thinking\": false}'"
    )
    parser.add_argument(
        "--concurrency", type=int, default=_C.concurrency, help="conversations in flight (default %(default)s)"
    )
    parser.add_argument("--max-retries", type=int, default=_C.max_retries, help="per request, with exponential backoff")
    parser.add_argument("--request-timeout", type=float, default=_C.timeout_s, help="seconds per request")
    parser.add_argument("--max-samples", type=int, default=None, help="first N rows of --data")
    parser.add_argument(
        "--max-turns",
        type=int,
        default=None,
        help="answer at most the first N turns of each conversation (default all; the rest are counted). A turn the "
        "server refuses as longer than its context ends its conversation: earlier turns are kept, the rest counted",
    )
    parser.add_argument(
        "--one-row-per",
        choices=("conversation", "turn"),
        default="conversation",
        help="multi-turn conversations: one token-id row per conversation (default) where each turn's prompt "
        "starts with the previous prompt + answer, else one row per turn (counted: conversations_split); or always "
        "one row per turn",
    )
    parser.add_argument(
        "--api",
        choices=("auto", "chat", "completions"),
        default="auto",
        help="auto (default): token-id prompts -> /v1/completions, conversations and text prompts -> "
        "/v1/chat/completions; completions: also send text `prompt` rows raw to /v1/completions (the server "
        "tokenizes them); chat: chat only (token-id rows are skipped)",
    )
    parser.add_argument("--overwrite", action="store_true", help="start --output afresh instead of resuming")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="only used if the server returns no token ids: tokenizer to tokenize the text with (warned)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtptune.data.regenerate import SamplingConfig, regenerate

    kwargs = None
    if args.chat_template_kwargs:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--chat-template-kwargs is not JSON: {exc}") from exc
    report = regenerate(
        data=args.data,
        output=args.output,
        endpoint=args.endpoint,
        served_model=args.served_model,
        sampling=SamplingConfig(args.temperature, args.top_p, args.max_tokens, args.seed, kwargs),
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        timeout_s=args.request_timeout,
        api_key=args.api_key,
        max_samples=args.max_samples,
        one_row_per=args.one_row_per,
        overwrite=args.overwrite,
        tokenizer=args.tokenizer,
        api=args.api,
        max_turns=args.max_turns,
    )
    print(report.summary())
    print(f"wrote {report.output} (report: {report.output}.report.json)")
    return 0
