"""What `regenerate` sends for one source row: the turns of a conversation (chat), or one completion prompt.

Conversations (OpenAI `messages` or ShareGPT `conversations`, roles `human`/`gpt`/...), turn by turn:

- Every assistant message of the source is replaced by the verifier's own answer, generated from the conversation
  so far (earlier turns hold the verifier's earlier answers). Its text is never sent, so an empty one is harmless.
- A turn is the user (and system) messages since the previous assistant message; consecutive user messages with no
  answer between them are sent together as one turn.
- A user message with no text (empty or only whitespace) is removed with the answer that followed it: the verifier
  would be answering nothing. Counted as `empty_user_message`.
- Assistant messages before the first user message (ShareGPT's split conversations often start with the answer to
  a question in an earlier part) have nothing to answer and are left out. Counted as `leading_assistant_message`.
- `max_turns` keeps the first N turns; the rest are counted as not regenerated (`max_turns`).
- Over-long conversations are cut where the server refuses a turn as longer than its context (see regenerate.py).

Prompt rows (`prompt`, `turns`, `question`, `instruction`) are conversations of user turns; token-id rows
(`prompt_ids`, `prompt_token_ids`, or `input_ids` + `loss_mask` whose masked-out prefix is the prompt) are one
completion prompt for /v1/completions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from mtptune.data.chat_render import is_chat_row, parse_conversation
from mtptune.data.readers import SourceRow
from mtptune.data.token_rows import Dropped

Api = Literal["auto", "chat", "completions"]
APIS: tuple[Api, ...] = ("auto", "chat", "completions")
TOKEN_PROMPT_KEYS = ("prompt_ids", "prompt_token_ids")


@dataclass(frozen=True)
class PromptConversation:
    """What to send: `turns[k]` are the non-assistant messages before assistant answer k (chat), or one `prompt`
    (token ids or text) for /v1/completions when `prompt` is set."""

    id: str
    where: str
    turns: list[list[dict[str, Any]]]
    prompt: list[int] | str | None = None
    max_tokens: int | None = None  # the row's own limit; None: SamplingConfig.max_tokens
    messages_left_out: dict[str, int] = field(default_factory=dict)  # reason -> source messages not sent
    turns_left_out: dict[str, int] = field(default_factory=dict)  # reason -> turns not sent (max_turns)

    @property
    def is_completion(self) -> bool:
        return self.prompt is not None


def _ids(value: Any) -> list[int] | None:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return [int(v) for v in value]


def token_prompt(data: dict[str, Any]) -> list[int] | Dropped | None:
    """The prompt ids of a token-id row (None: not a token-id row)."""
    for key in TOKEN_PROMPT_KEYS:
        if key in data:
            ids = _ids(data[key])
            if not ids:
                return Dropped("bad_type", f"{key} must be a non-empty list of token ids")
            return ids
    if isinstance(data.get("prompt"), list) and data["prompt"] and (ids := _ids(data["prompt"])):
        return ids  # an OpenAI completions-style token-id prompt
    if "input_ids" not in data:
        return None
    ids, mask = _ids(data["input_ids"]), _ids(data.get("loss_mask"))
    if ids is None:
        return Dropped("bad_type", "input_ids must be a list of token ids")
    if mask is None or len(mask) != len(ids):
        return Dropped("token_id_row", "input_ids without a loss_mask of the same length: no prompt to tell apart")
    prompt = ids[: mask.index(1)] if 1 in mask else ids
    if not prompt:
        return Dropped("no_prompt", "loss_mask supervises the first token: the row has no prompt prefix")
    return prompt


def row_max_tokens(data: dict[str, Any]) -> int | Dropped | None:
    value = data.get("max_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return Dropped("bad_type", f"max_tokens must be a positive integer, got {value!r}")
    return value


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or OpenAI content parts (`{"type": "text", "text": ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return ""


def chat_turns(messages: list[dict[str, Any]]) -> tuple[list[list[dict[str, Any]]], Counter[str]]:
    """The turns to send for a conversation's messages (roles already canonical), and the messages left out."""
    left_out: Counter[str] = Counter()
    turns: list[list[dict[str, Any]]] = []
    pending: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant":
            if any(p["role"] == "user" for p in pending):
                turns.append(pending)
                pending = []
            elif not turns and not any(p["role"] == "user" for p in pending):
                left_out["leading_assistant_message"] += 1
            continue
        if m["role"] == "user" and not message_text(m["content"]).strip():
            left_out["empty_user_message"] += 1
            continue
        pending.append({"role": m["role"], "content": m["content"]})
    if any(p["role"] == "user" for p in pending):
        turns.append(pending)
    elif pending and turns:
        turns[-1].extend(pending)
    return turns, left_out


def conversation_turns(src: SourceRow, api: Api = "auto", max_turns: int | None = None) -> PromptConversation | Dropped:
    """What to send for a row: token-id prompts (completions), chat rows (assistant answers are dropped and
    regenerated) or prompt rows (chat, or completions when `api="completions"`)."""
    data = src.data
    cid = str(data.get("id", src.where))
    max_tokens = row_max_tokens(data)
    if isinstance(max_tokens, Dropped):
        return max_tokens
    ids = token_prompt(data)
    if ids is not None:
        if isinstance(ids, Dropped):
            return ids
        if api == "chat":
            return Dropped("token_id_row", "row holds token ids; --api chat sends messages (use --api auto)")
        return PromptConversation(cid, src.where, [], ids, max_tokens)
    if is_chat_row(data):
        if api == "completions":
            return Dropped("chat_row", "--api completions sends prompts, not conversations (use --api auto)")
        conv = parse_conversation(data)
        if isinstance(conv, Dropped):
            return conv
        if any(m["role"] == "tool" or m.get("tool_calls") for m in conv.messages):
            return Dropped("has_tool_calls", "tool calls/results cannot be replayed against new answers")
        messages = conv.messages
    else:
        prompts = data.get("turns", data.get("prompt", data.get("question", data.get("instruction"))))
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            return Dropped("missing_field", "row has no messages/conversations/prompt/turns/question to send")
        if api == "completions":
            if len(prompts) != 1:
                return Dropped("multi_turn_prompt", "--api completions sends one prompt per row, not a list of turns")
            return PromptConversation(cid, src.where, [], prompts[0], max_tokens)
        system = [{"role": "system", "content": data["system"]}] if isinstance(data.get("system"), str) else []
        # each prompt is answered before the next is sent
        messages = system + [m for p in prompts for m in ({"role": "user", "content": p}, {"role": "assistant"})]
    turns, left_out = chat_turns(messages)
    if not turns:
        why = "only empty user messages" if left_out["empty_user_message"] else "no user message"
        return Dropped("no_user_turn", f"conversation has {why} to answer")
    if turns[0][0]["role"] == "system" and len(turns[0]) == 1:
        return Dropped("no_user_turn", "conversation has only a system message")
    cut = {"max_turns": len(turns) - max_turns} if max_turns is not None and len(turns) > max_turns else {}
    return PromptConversation(cid, src.where, turns[:max_turns], None, max_tokens, dict(left_out), cut)
