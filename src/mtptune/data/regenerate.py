"""`regenerate`: let the target model write the answers, through any OpenAI-compatible endpoint.

MTP heads learn best on the target's own text. Each conversation's user turns are sent in order to
`/v1/chat/completions` with `return_token_ids: true`; every assistant turn is the model's answer to a history made
of its own earlier answers (which messages make a turn, and what happens to empty ones: prompt_turns.py).

Over-long conversations: a turn the server refuses because its prompt plus `max_tokens` does not fit the model's
context (HTTP 400 naming the context length) ends the conversation there. The turns answered before it are kept;
it and the later turns are counted in the report (`turns_not_regenerated["context_length"]`, `conversations_cut`).
A conversation whose first turn is refused writes nothing and counts as failed (`context_length`). An answer cut by
`max_tokens` (finish reason `length`) is kept and the conversation goes on. Rows are written as format (a) (`input_ids` = the server's prompt ids + generated ids,
`loss_mask` 0 / 1), so no re-tokenization drift is possible. Only when a server returns no ids do we tokenize the
text locally (needs `tokenizer`), and every such row is counted and warned about.

Prompts given as token ids (`prompt_ids` / `prompt_token_ids` rows, or `input_ids` + `loss_mask` rows whose
masked-out prefix is the prompt) go to `/v1/completions` instead (`"prompt": ids`, `return_token_ids: true`), as do
plain-text `prompt` rows with `api="completions"` (the server tokenizes them). A row's own `max_tokens` overrides
the global one. `api="auto"` (default) picks per row: token ids -> completions, everything else -> chat.

A conversation is written as one row (every answer supervised) when each turn's prompt ids start with the previous
prompt + answer ids, else one row per turn (`one_row_per="turn"` forces that). Rows are appended to a jsonl as
conversations finish (all rows of a conversation in one write); a re-run skips conversation ids already in the file
(resume).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable, Collection, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mtptune.data.chat_render import OneRowPer
from mtptune.data.presets import read_source
from mtptune.data.prompt_turns import APIS, Api, PromptConversation, conversation_turns
from mtptune.data.readers import SourceRow, decode_utf8
from mtptune.data.regenerate_config import DEFAULT_SAMPLING, ClientConfig, SamplingConfig
from mtptune.data.token_rows import Dropped
from mtptune.errors import DataError, ServerError
from mtptune.openai_http import GaveUp, HttpStatusError, OpenAIHttpClient, normalize_endpoint

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the progress bar
# How vLLM and `mtptune serve` word a request longer than the model's context (HTTP 400).
CONTEXT_LENGTH_WORDS = ("context length", "context window")


@dataclass(frozen=True)
class RegenerateReport:
    output: str
    conversations_in: int
    skipped_existing: int  # already in the output (resume)
    skipped: dict[str, int]  # reason -> conversations not sendable (e.g. token-id rows, tool calls)
    regenerated: int  # conversations written this run
    failed: dict[str, int]  # reason -> conversations whose requests failed for good
    failure_examples: dict[str, list[str]]
    rows_written: int
    turns_regenerated: int  # answers written this run
    turns_not_regenerated: dict[str, int]  # reason ("context_length", "max_turns") -> turns of sent conversations
    conversations_cut: int  # conversations written without their last turn(s) (context length, max_turns)
    messages_left_out: dict[str, int]  # reason -> source messages not sent ("empty_user_message", ...)
    tokenized_locally: int  # turns whose ids we had to tokenize (server returned none)
    conversations_split: int  # one_row_per=conversation, but turns were not prefix-stable
    finish_reasons: dict[str, int]
    prompt_tokens: int
    generated_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        return (
            f"{self.conversations_in} conversations: {self.regenerated} regenerated ({self.rows_written} rows, "
            f"{self.generated_tokens} generated tokens, {self.turns_regenerated} answers), "
            f"{self.skipped_existing} already done, skipped {dict(self.skipped) or 0}, failed {dict(self.failed) or 0}, "
            f"cut {self.conversations_cut} (turns not regenerated: {dict(self.turns_not_regenerated) or 0}), "
            f"tokenized locally {self.tokenized_locally}"
        )


@dataclass
class TurnResult:
    prompt_ids: list[int]
    generated_ids: list[int]
    message: dict[str, Any]
    finish_reason: str
    tokenized_locally: bool


class ChatClient:
    """One conversation at a time per task; transient failures are retried (`ClientConfig.retry_policy`)."""

    def __init__(
        self,
        config: ClientConfig,
        sampling: SamplingConfig,
        http: OpenAIHttpClient,
        tokenizer_factory: Callable[[], PreTrainedTokenizerBase | None],
    ) -> None:
        self.config, self.sampling, self.http = config, sampling, http
        self.tokenizer_factory = tokenizer_factory
        self.model = config.model

    async def resolve_model(self) -> str:
        if self.model is None:
            body = await self.request("GET", "/models")
            try:
                self.model = str(body["data"][0]["id"])
            except (KeyError, IndexError, TypeError) as exc:
                raise ServerError(f"{self.config.endpoint}/models lists no model; pass --served-model.") from exc
        return self.model

    async def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """The response JSON; raises HttpStatusError (a 4xx), GaveUp (retries exhausted) or ServerError."""
        url = self.config.endpoint.rstrip("/") + path
        return await self.http.request(method, url, payload, self.config.retry_policy)

    async def payload(self, max_tokens: int | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": await self.resolve_model(),
            "max_tokens": self.sampling.max_tokens if max_tokens is None else max_tokens,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "return_token_ids": True,
            "stream": False,
        }
        if self.sampling.seed is not None:
            payload["seed"] = self.sampling.seed
        return payload

    async def complete(self, prompt: list[int] | str, max_tokens: int | None = None) -> TurnResult:
        """One POST /v1/completions: the continuation of `prompt` (token ids or text) with the server's ids."""
        payload = await self.payload(max_tokens)
        payload["prompt"] = prompt
        body = await self.request("POST", "/completions", payload)
        try:
            choice = body["choices"][0]
        except (KeyError, IndexError, TypeError) as exc:
            raise ServerError(f"completion without choices[0]: {str(body)[:300]}") from exc
        text = str(choice.get("text") or "")
        answer = {"role": "assistant", "content": text}
        finish = str(choice.get("finish_reason"))
        prompt_ids = choice.get("prompt_token_ids") or body.get("prompt_token_ids")
        generated = choice.get("token_ids")
        if prompt_ids and generated is not None:
            return TurnResult([int(t) for t in prompt_ids], [int(t) for t in generated], answer, finish, False)
        tokenizer = self.tokenizer_factory()
        if tokenizer is None:
            raise ServerError(
                "the server returned no token ids (return_token_ids unsupported?) and no tokenizer was given to "
                "tokenize the completion; pass --tokenizer (the verifier folder)."
            )
        if isinstance(prompt, str):
            prompt = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        gen = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return TurnResult(list(prompt), gen, answer, finish, True)

    async def answer(self, messages: list[dict[str, Any]], max_tokens: int | None = None) -> TurnResult:
        payload = await self.payload(max_tokens)
        payload["messages"] = messages
        if self.sampling.chat_template_kwargs:
            payload["chat_template_kwargs"] = self.sampling.chat_template_kwargs
        body = await self.request("POST", "/chat/completions", payload)
        try:
            choice = body["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError) as exc:
            raise ServerError(f"chat completion without choices[0].message: {str(body)[:300]}") from exc
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        answer: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            answer["reasoning_content"] = reasoning
        finish = str(choice.get("finish_reason"))
        prompt_ids = body.get("prompt_token_ids") or choice.get("prompt_token_ids")
        generated = choice.get("token_ids")
        if prompt_ids and generated is not None:
            return TurnResult([int(t) for t in prompt_ids], [int(t) for t in generated], answer, finish, False)
        return self.tokenize_locally(messages, answer, finish)

    def tokenize_locally(self, messages: list[dict[str, Any]], answer: dict[str, Any], finish: str) -> TurnResult:
        tokenizer = self.tokenizer_factory()
        if tokenizer is None or not tokenizer.chat_template:
            raise ServerError(
                "the server returned no token ids (return_token_ids unsupported?) and no tokenizer with a chat "
                "template was given to tokenize the text; pass --tokenizer (the verifier folder)."
            )
        kwargs = dict(self.sampling.chat_template_kwargs or {})
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        full_text = tokenizer.apply_chat_template(
            [*messages, answer], tokenize=False, add_generation_prompt=False, **kwargs
        )
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        if full_text.startswith(prompt_text):
            # The template's rendering of the answer carries any reasoning markup; cut template whitespace after
            # the end-of-turn token, which the model does not generate.
            gen = list(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
            eos = tokenizer.eos_token_id
            if eos in gen:
                gen = gen[: len(gen) - gen[::-1].index(eos)]
        else:
            gen = list(tokenizer(answer["content"], add_special_tokens=False)["input_ids"])
        if finish != "stop" and tokenizer.eos_token_id in gen:
            gen = gen[: gen.index(tokenizer.eos_token_id)]
        return TurnResult(prompt_ids, gen, answer, finish, True)


def rows_for(conv: PromptConversation, results: list[TurnResult], one_row_per: OneRowPer) -> tuple[list[dict], bool]:
    """Format-(a) rows for one regenerated conversation; returns (rows, split) where split means conversation mode
    fell back to one row per turn because a later prompt did not start with the earlier prompt + answer."""
    if conv.is_completion:
        [res] = results
        row = {
            "id": conv.id,
            "turn": 0,
            "input_ids": res.prompt_ids + res.generated_ids,
            "loss_mask": [0] * len(res.prompt_ids) + [1] * len(res.generated_ids),
            "finish_reason": res.finish_reason,
            "source": conv.where,
        }
        return [row], False
    history: list[dict[str, Any]] = []
    per_turn: list[dict[str, Any]] = []
    for k, (turn, res) in enumerate(zip(conv.turns, results)):
        history = [*history, *turn, res.message]
        per_turn.append(
            {
                "id": conv.id,
                "turn": k,
                "input_ids": res.prompt_ids + res.generated_ids,
                "loss_mask": [0] * len(res.prompt_ids) + [1] * len(res.generated_ids),
                "messages": history,
                "finish_reason": res.finish_reason,
                "source": conv.where,
            }
        )
    if one_row_per == "turn" or len(results) == 1:
        return per_turn, False
    ids: list[int] = []
    mask: list[int] = []
    for res in results:
        if res.prompt_ids[: len(ids)] != ids:
            return per_turn, True
        gap = res.prompt_ids[len(ids) :]
        ids += gap + res.generated_ids
        mask += [0] * len(gap) + [1] * len(res.generated_ids)
    row = dict(per_turn[-1], input_ids=ids, loss_mask=mask, turn=None)
    row["finish_reason"] = [r.finish_reason for r in results]
    return [row], False


def done_ids(output: Path) -> set[str]:
    """Conversation ids already in `output`; a torn last line from a crash is cut off."""
    if not output.is_file():
        return set()
    raw = output.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        log.warning("%s: dropping a partly written last line (interrupted run)", output)
        with output.open("r+b") as f:
            f.truncate(keep)
        raw = raw[:keep]
    ids: set[str] = set()
    for lineno, line in enumerate(decode_utf8(raw, output).splitlines(), start=1):
        if line.strip():
            try:
                ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{output}:{lineno}: not a regenerate row ({exc}); use another --output.") from exc
    return ids


def is_context_length_error(exc: Exception) -> bool:
    """A 400 because the prompt plus max_tokens does not fit the model's context (vLLM's and our wording)."""
    return (
        isinstance(exc, HttpStatusError)
        and exc.status == 400
        and any(w in exc.body.lower() for w in CONTEXT_LENGTH_WORDS)
    )


def failure_reason(exc: ServerError) -> str:
    """The report key of a conversation whose request failed for good."""
    if is_context_length_error(exc):
        return "context_length"
    if isinstance(exc, HttpStatusError) or (isinstance(exc, GaveUp) and getattr(exc.last, "status", None)):
        return "http_error"
    return "server_error"


@dataclass
class Regenerated:
    """The answers of one conversation, and how many of its turns were cut for the context length."""

    results: list[TurnResult]
    cut_for_context: int = 0


async def _regenerate(
    conversations: list[PromptConversation],
    output: Path,
    client_config: ClientConfig,
    sampling: SamplingConfig,
    one_row_per: OneRowPer,
    tokenizer_factory: Callable[[], PreTrainedTokenizerBase | None],
) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "failed": Counter(),
        "examples": {},
        "rows": 0,
        "done": 0,
        "local": 0,
        "split": 0,
        "turns": 0,
        "cut": 0,
        "not_regenerated": Counter(),
        "left_out": Counter(),
        "finish": Counter(),
        "prompt_tokens": 0,
        "generated_tokens": 0,
    }
    http = OpenAIHttpClient(client_config.concurrency, client_config.timeout_s, client_config.api_key)
    tasks: list[asyncio.Task] = []
    try:
        chat = ChatClient(client_config, sampling, http, tokenizer_factory)
        await chat.resolve_model()  # fail fast on a wrong endpoint
        gate = asyncio.Semaphore(client_config.concurrency)

        async def one(conv: PromptConversation) -> tuple[PromptConversation, Regenerated | ServerError]:
            async with gate:
                history: list[dict[str, Any]] = []
                done = Regenerated([])
                try:
                    if conv.is_completion:
                        assert conv.prompt is not None
                        done.results.append(await chat.complete(conv.prompt, conv.max_tokens))
                    for k, turn in enumerate(conv.turns):
                        try:
                            res = await chat.answer([*history, *turn], conv.max_tokens)
                        except HttpStatusError as exc:
                            if not is_context_length_error(exc) or k == 0:
                                raise
                            done.cut_for_context = len(conv.turns) - k  # keep the turns answered so far
                            break
                        done.results.append(res)
                        history = [*history, *turn, res.message]
                except ServerError as exc:
                    return conv, exc
                return conv, done

        tasks.extend(asyncio.create_task(one(c)) for c in conversations)
        with output.open("a", encoding="utf-8") as f, tqdm(total=len(tasks), desc="regenerate", unit="conv") as bar:
            for next_done in asyncio.as_completed(tasks):
                conv, outcome = await next_done
                bar.update(1)
                stats["left_out"].update(conv.messages_left_out)
                stats["not_regenerated"].update(conv.turns_left_out)
                if isinstance(outcome, ServerError):
                    reason = failure_reason(outcome)
                    stats["failed"][reason] += 1
                    if reason == "context_length":
                        stats["not_regenerated"]["context_length"] += len(conv.turns)
                    ex = stats["examples"].setdefault(reason, [])
                    if len(ex) < 5:
                        ex.append(f"{conv.where}: {outcome}")
                    continue
                rows, split = rows_for(conv, outcome.results, one_row_per)
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                f.flush()
                stats["rows"] += len(rows)
                stats["done"] += 1
                stats["split"] += split
                stats["turns"] += len(outcome.results)
                if outcome.cut_for_context:
                    stats["not_regenerated"]["context_length"] += outcome.cut_for_context
                stats["cut"] += bool(outcome.cut_for_context or conv.turns_left_out)
                for res in outcome.results:
                    stats["local"] += res.tokenized_locally
                    stats["finish"][res.finish_reason] += 1
                    stats["prompt_tokens"] += len(res.prompt_ids)
                    stats["generated_tokens"] += len(res.generated_ids)
    finally:
        # A stop (Ctrl-C, a failed write) ends the conversations still running before their client closes; else
        # they meet the closed client and each prints a traceback.
        await _cancel_all(tasks)
        await http.aclose()
    return stats


_T = TypeVar("_T")


async def _cancel_all(tasks: Collection[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until each has ended (finished ones are left as they are)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_interruptible(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` in which Ctrl-C always ends in KeyboardInterrupt. The first SIGINT cancels `main` (its
    finally blocks stop the requests and close the connections); KeyboardInterrupt follows once it has ended, even if
    the cancellation was absorbed on the way, where asyncio.run would return normally and the Ctrl-C be lost (seen
    once: a demo that ran to its end after a Ctrl-C during regeneration). A second SIGINT raises at once."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(main)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main)
    interrupts = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1 or task.done():
            raise KeyboardInterrupt
        loop.call_soon_threadsafe(task.cancel)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = loop.run_until_complete(task)
    except asyncio.CancelledError:
        if interrupts:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        loop.run_until_complete(_cancel_all(asyncio.all_tasks(loop)))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()
    if interrupts:
        raise KeyboardInterrupt
    return result


def regenerate(
    data: list[str],
    output: str | Path,
    endpoint: str,
    served_model: str | None = None,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    concurrency: int = ClientConfig.concurrency,
    max_retries: int = ClientConfig.max_retries,
    timeout_s: float = ClientConfig.timeout_s,
    api_key: str | None = None,
    max_samples: int | None = None,
    one_row_per: OneRowPer = "conversation",
    overwrite: bool = False,
    tokenizer: str | None = None,
    api: Api = "auto",
    max_turns: int | None = None,
) -> RegenerateReport:
    """Regenerate the assistant turns of `data` (files, folders, presets) through `endpoint` into the jsonl
    `output` (resuming unless `overwrite`), and write `<output>.report.json`. `api`: "auto" sends token-id prompts
    to /v1/completions and conversations/prompts to /v1/chat/completions; "chat" / "completions" force one.
    `max_turns`: answer at most the first N turns of each conversation."""
    if api not in APIS:
        raise DataError(f"--api must be one of {', '.join(APIS)}, got {api!r}.")
    if concurrency < 1:
        raise DataError(f"--concurrency must be at least 1, got {concurrency}.")
    if max_turns is not None and max_turns < 1:
        raise DataError(f"--max-turns must be at least 1, got {max_turns}.")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max-samples must be positive, got {max_samples}.")
    output = Path(output)
    if output.is_dir():
        raise DataError(f"--output {output} is a folder; regenerate writes a .jsonl file.")
    output.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and output.exists():
        output.unlink()
    already = done_ids(output)

    sources: list[SourceRow] = list(itertools.islice(itertools.chain(*map(read_source, data)), max_samples))
    if not sources:
        raise DataError(f"--data {' '.join(data)}: empty dataset (no rows).")
    skipped: Counter[str] = Counter()
    todo: list[PromptConversation] = []
    seen: set[str] = set()
    skipped_existing = 0
    for src in sources:
        conv = conversation_turns(src, api, max_turns)
        if isinstance(conv, Dropped):
            skipped[conv.reason] += 1
            log.debug("%s: skipped: %s", src.where, conv.detail)
            continue
        if conv.id in seen:
            skipped["duplicate_id"] += 1
            continue
        seen.add(conv.id)
        if conv.id in already:
            skipped_existing += 1
            continue
        todo.append(conv)
    for reason, count in sorted(skipped.items()):
        log.warning("skipped %d row(s): %s", count, reason)

    loaded: list[PreTrainedTokenizerBase | None] = []

    def tokenizer_factory() -> PreTrainedTokenizerBase | None:
        if not loaded:
            from mtptune.data.tokenizers import load_tokenizer

            loaded.append(load_tokenizer(tokenizer) if tokenizer else None)
        return loaded[0]

    client_config = ClientConfig(
        normalize_endpoint(endpoint), served_model, api_key, concurrency, max_retries, timeout_s
    )
    stats = run_interruptible(_regenerate(todo, output, client_config, sampling, one_row_per, tokenizer_factory))
    if stats["local"]:
        log.warning(
            "%d turn(s) came back without token ids and were tokenized locally with %s; retokenized text may "
            "differ from what the model generated (serve with return_token_ids support to avoid this).",
            stats["local"],
            tokenizer,
        )
    if stats["split"]:
        log.warning("%d conversation(s) were not prefix-stable and were written one row per turn", stats["split"])
    if stats["cut"]:
        log.warning(
            "%d conversation(s) were written without their last turn(s): turns not regenerated %s",
            stats["cut"],
            dict(stats["not_regenerated"]),
        )
    for reason, count in sorted(stats["left_out"].items()):
        log.warning("%d source message(s) not sent: %s", count, reason)
    for reason, count in sorted(stats["failed"].items()):
        log.warning("%d conversation(s) failed (%s), e.g. %s", count, reason, stats["examples"][reason][0])
    report = RegenerateReport(
        output=str(output),
        conversations_in=len(sources),
        skipped_existing=skipped_existing,
        skipped=dict(skipped),
        regenerated=stats["done"],
        failed=dict(stats["failed"]),
        failure_examples=stats["examples"],
        rows_written=stats["rows"],
        turns_regenerated=stats["turns"],
        turns_not_regenerated=dict(stats["not_regenerated"]),
        conversations_cut=stats["cut"],
        messages_left_out=dict(stats["left_out"]),
        tokenized_locally=stats["local"],
        conversations_split=stats["split"],
        finish_reasons=dict(stats["finish"]),
        prompt_tokens=stats["prompt_tokens"],
        generated_tokens=stats["generated_tokens"],
        settings={
            "endpoint": client_config.endpoint,
            "served_model": served_model,
            "sampling": asdict(sampling),
            "concurrency": concurrency,
            "one_row_per": one_row_per,
            "api": api,
            "max_turns": max_turns,
            "completions": sum(c.is_completion for c in todo),
            "data": list(data),
        },
    )
    output.with_name(output.name + ".report.json").write_text(report.to_json() + "\n")
    if todo and not stats["done"]:
        raise ServerError(f"every request failed; first: {next(iter(stats['examples'].values()))[0]}")
    log.info("regenerate: %s -> %s", report.summary(), output)
    return report
