"""Chat templates and tokenization off the event loop, with a time limit; request-supplied templates by consent.

A chat template is a Jinja program. Rendered on the server's event loop, one with nested loops would freeze every other
request, `/health` included, for as long as it runs. So each render runs on its own daemon thread, bounded by
`--chat-template-timeout`: past it the request gets a 400 and the thread is stopped with an asynchronous exception
(`PyThreadState_SetAsyncExc`), which Python raises at the thread's next bytecode, i.e. inside Jinja's loops. Work that
stays in C (a tokenizer's Rust encode) cannot be interrupted, but it is linear in a body the server bounds. A template
sent with the request (`chat_template`, or `chat_template_kwargs.chat_template`) is refused unless the operator started
the server with `--trust-request-chat-template`, as vLLM does: a Jinja program can also allocate without bound, which no
time limit catches.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mtptune.serving.protocol import ChatCompletionRequest, Rejected

T = TypeVar("T")

# Keys of chat_template_kwargs that are the server's own rendering parameters, not template variables: passing them
# would change what the server returns (text instead of ids, tensors, truncation) or which template runs.
_TEMPLATE_VARIABLES_ALLOWED = {"tools", "documents"}


class RenderInterrupted(BaseException):
    """Raised inside a render thread that ran past its time limit (a BaseException, so no `except Exception` in a
    template library swallows it)."""


def request_template(body: ChatCompletionRequest, trusted: bool) -> str | None:
    """The template a chat request brings (None: the tokenizer's own). Refused (400) unless `trusted`."""
    kwargs = body.chat_template_kwargs or {}
    given = [(name, value) for name, value in (
        ("chat_template", body.chat_template), ("chat_template_kwargs.chat_template", kwargs.get("chat_template"))
    ) if value is not None]  # fmt: skip
    if not given:
        return None
    name, value = given[0]
    if not trusted:
        raise Rejected(
            400,
            f"{name}: this server renders only its tokenizer's chat template; a template sent with the request is "
            "refused (a template is a program the server would run). Drop the field, or start the server with "
            "--trust-request-chat-template if you trust every client.",
            param=name.split(".")[0],
        )
    if not isinstance(value, str):
        raise Rejected(400, f"{name} must be a string (a Jinja template), got {type(value).__name__}.", param=name)
    return value


def template_kwargs(body: ChatCompletionRequest, tokenizer: Any) -> dict[str, Any]:
    """`chat_template_kwargs` as template variables; a key naming one of `apply_chat_template`'s own parameters is a
    400 (it would change the output's form, not the text)."""
    kwargs = dict(body.chat_template_kwargs or {})
    kwargs.pop("chat_template", None)  # handled by request_template
    own = set(inspect.signature(tokenizer.apply_chat_template).parameters) - {"self", "kwargs"}
    reserved = sorted(k for k in kwargs if k in own and k not in _TEMPLATE_VARIABLES_ALLOWED)
    if reserved:
        raise Rejected(
            400,
            f"chat_template_kwargs.{reserved[0]} is a parameter of the server's rendering, not a template variable; "
            "drop it (add_generation_prompt and continue_final_message are top-level request fields).",
            param="chat_template_kwargs",
        )
    return kwargs


async def run_with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """`fn()` on a fresh daemon thread; the event loop stays free. Past `timeout` seconds (or when the awaiting task
    is cancelled: the client left) the thread is interrupted and `Rejected(400)` is raised."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[Any], None], value: Any) -> None:
        if not future.done():  # not already timed out or cancelled
            outcome(value)

    def target() -> None:
        try:
            result = fn()
        except RenderInterrupted:
            return
        except BaseException as exc:  # handed to the awaiting request
            loop.call_soon_threadsafe(settle, future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, future.set_result, result)

    thread = threading.Thread(target=target, name="chat-render", daemon=True)
    thread.start()
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        interrupt(thread)
        raise Rejected(
            400,
            f"{what} did not finish within {timeout:g} s (--chat-template-timeout); the request is refused. A "
            "template with large loops, or a huge prompt, takes that long.",
            param="messages",
        ) from None
    except asyncio.CancelledError:
        interrupt(thread)
        raise


def interrupt(thread: threading.Thread) -> bool:
    """Raise RenderInterrupted in `thread` at its next bytecode; False when it had already finished."""
    if thread.ident is None or not thread.is_alive():
        return False
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(RenderInterrupted))
    return hit == 1
