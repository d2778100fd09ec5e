"""What the server checks around every request before and after its endpoint runs (one ASGI middleware), and
how an endpoint stops its work when the client has gone.

`RequestGuard` answers 401 without the API key, 413 for a body over `--max-body-bytes` and records each request's status
and latency. The size limit is enforced on the bytes actually read, not on the `Content-Length` header alone: a chunked
body has no such header. The body is read in full here (never more than the limit plus one network chunk) and replayed
to the endpoint; later `receive()` calls go to the server, so an endpoint can still learn that its client disconnected
(`until_disconnected`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mtptune.serving.protocol import error_body

T = TypeVar("T")
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# nginx's "client closed request": what the metrics record for a request whose client left before its answer.
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The client disconnected before its answer; the endpoint's work was cancelled."""


class RequestGuard:
    """Pure ASGI middleware: API key on /v1, body size on the bytes read, per-request metrics."""

    def __init__(
        self,
        app: Callable,
        max_body_bytes: int,
        api_key: str | None,
        on_request: Callable[[str, int, float], None],
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.expected_auth = None if api_key is None else f"Bearer {api_key}".encode()
        self.on_request = on_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path: str = scope["path"]
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refuse_headers(scope)
            if refusal is None:
                body, refusal = await self._read_body(receive)
            if refusal is not None:
                await _send_json(send_recording, *refusal)
                return
            await self.app(scope, _replay(body, receive), send_recording)
        except ClientGone:
            status = CLIENT_CLOSED_REQUEST
        finally:
            if path != "/metrics":
                self.on_request(path, status, time.perf_counter() - start)

    def _refuse_headers(self, scope: Scope) -> tuple[int, dict] | None:
        headers = dict(scope.get("headers") or ())
        guarded = scope["path"].startswith("/v1") and self.expected_auth is not None
        if guarded and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected_auth):
            return 401, error_body("Unauthorized: missing or wrong API key.", 401, "AuthenticationError")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return 413, self._too_large()
        return None

    async def _read_body(self, receive: Receive) -> tuple[bytes, tuple[int, dict] | None]:
        """The whole request body, or a 413 as soon as more than the limit has arrived (chunked or not)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", (413, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self) -> dict:
        return error_body(
            f"Request body over {self.max_body_bytes} bytes (--max-body-bytes); send a smaller request.",
            413,
            "RequestTooLargeError",
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands out the buffered body once, then the server's own messages (the disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is never read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def until_disconnected(receive: Receive) -> None:
    """Return once the client has disconnected (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive: Receive, on_abandon: Callable[[], None]) -> T:
    """Await `work`; if the client disconnects first, cancel it (a queued request leaves the queue, a running
    generation stops at its next token), call `on_abandon` and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        on_abandon()
        raise ClientGone
    finally:
        watcher.cancel()
        if not task.done():  # this coroutine itself was cancelled
            task.cancel()
