"""HTTP to OpenAI-compatible servers (vLLM, `mtptune serve`): the one client behind `regenerate` and the trainer's
hidden-state client.

- `normalize_endpoint`: what a user types as `--endpoint` / `--vllm-endpoint` -> the OpenAI base URL.
- `OpenAIHttpClient.send`: one JSON request over pooled connections; a failure that another attempt may fix
  (connection error, 408/409/425/429, 5xx other than 501/505/507) raises `Unavailable`, HTTP 507 (the server's
  storage is full) raises `InsufficientStorage`, an error response that will repeat raises `HttpStatusError`.
- `with_retries`: attempts with exponential backoff (`RetryPolicy`); a server that is down may be waited for longer
  than `max_retries` attempts (`wait_timeout`), e.g. while it restarts. A full disk is not waited for: it is
  retried `max_retries` times only (the client's own deletions may free space), then given up.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from mtptune.errors import ServerError

T = TypeVar("T")
# Statuses a later attempt may fix (timeouts, rate limits, a server restarting or overloaded).
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
FINAL_5XX = frozenset({501, 505})  # "not implemented", "HTTP version not supported": no retry fixes these
INSUFFICIENT_STORAGE = 507  # the server cannot store the result (the built-in server's full storage folder)
BODY_IN_MESSAGE = 500  # characters of an error body quoted in messages


def normalize_endpoint(url: str) -> str:
    """The OpenAI base URL for `url`: `host:8000`, `http://host:8000` and `http://host:8000/` mean
    `http://host:8000/v1`; a URL with a path (`http://host:8000/v1`, `https://gateway/openai/v1`) is kept as given,
    without a trailing slash."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    parsed = httpx.URL(url)
    if parsed.path in ("", "/"):
        return url + "/v1"
    return url


def server_root(endpoint: str) -> str:
    """The server's root (where `/health` and `/metrics` live) for an OpenAI base URL: without a final `/v1`."""
    return normalize_endpoint(endpoint).removesuffix("/v1")


def bearer_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or (status >= 500 and status not in FINAL_5XX)


class RetryableError(Exception):
    """An attempt failed in a way another attempt may fix."""


class Unavailable(RetryableError):
    """The server did not answer properly (connection error or a retryable status): it may be restarting."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # None: no response at all


class InsufficientStorage(RetryableError):
    """HTTP 507: the server's storage is full. Retried `max_retries` times (space may be freed meanwhile), never
    waited for like a restarting server; `server_message` is the server's own `error.message`."""

    status = INSUFFICIENT_STORAGE

    def __init__(self, message: str, server_message: str) -> None:
        super().__init__(message)
        self.server_message = server_message


def error_message(response: httpx.Response) -> str:
    """The OpenAI-style `error.message` of an error response, else its text (both as the server wrote them)."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:BODY_IN_MESSAGE]
    return message if isinstance(message, str) else response.text[:BODY_IN_MESSAGE]


class HttpStatusError(ServerError):
    """An error response that another attempt would get again (a 4xx such as a malformed or too long request)."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} returned HTTP {status}: {body[:BODY_IN_MESSAGE]}")
        self.status = status
        self.body = body


class GaveUp(ServerError):
    """Every attempt failed with a retryable error; `last` is the last one."""

    def __init__(self, last: RetryableError, attempts: int, waited_s: float) -> None:
        super().__init__(f"{last} (after {attempts} attempts)")
        self.last = last
        self.attempts = attempts
        self.waited_s = waited_s


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` extra attempts after the first; before retry k (1, 2, ...) wait
    min(backoff_max, backoff_base * 2**(k-1)) seconds, times a random factor in [0.5, 1.5) with `jitter`. An
    `Unavailable` server is retried at least until `wait_timeout` seconds have passed since its first failure."""

    max_retries: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    jitter: bool = True
    wait_timeout: float = 0.0

    def delay(self, retry: int) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** (retry - 1))
        return delay * (0.5 + random.random()) if self.jitter else delay


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    on_retry: Callable[[RetryableError, int, float], None] | None = None,
    hurry: Callable[[], bool] | None = None,
) -> T:
    """`await attempt()` until it returns; retry `RetryableError`s per `policy` (other exceptions propagate at once).

    `on_retry(error, attempts_so_far, seconds_unavailable)` is called before each retry; when the policy gives up,
    `GaveUp` carries the last error. A backoff ends early once `hurry()` is true (its caller is closing: the next
    attempt should find that out at once instead of after seconds of sleep).
    """
    down_since: float | None = None
    attempts = 0
    while True:
        if attempts:
            await _backoff(policy.delay(attempts), hurry)
        attempts += 1
        try:
            return await attempt()
        except RetryableError as exc:
            waited = 0.0
            if isinstance(exc, Unavailable):
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                waited = now - down_since
            wait_more = isinstance(exc, Unavailable) and waited < policy.wait_timeout
            if attempts > policy.max_retries and not wait_more:
                raise GaveUp(exc, attempts, waited) from exc
            if on_retry is not None:
                on_retry(exc, attempts, waited)


async def _backoff(seconds: float, hurry: Callable[[], bool] | None) -> None:
    if hurry is None:
        await asyncio.sleep(seconds)
        return
    deadline = time.monotonic() + seconds
    while not hurry() and (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.05))


class ConnectionPools:
    """Several small httpx connection pools used in turn instead of one large one: httpcore checks every pooled
    connection for expiry whenever it hands one out, so one large pool costs the event loop a scan per request
    (measured in docs/benchmarks.md, "Built-in server on GPU — Qwen3.5-9B-shaped verifier")."""

    CONNECTIONS_PER_POOL = 4

    def __init__(self, connections: int, timeout: float, headers: dict[str, str]) -> None:
        per_pool = min(max(1, connections), self.CONNECTIONS_PER_POOL)
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        self.clients = [
            httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers)
            for _ in range(-(-max(1, connections) // per_pool))
        ]
        self._turn = itertools.cycle(self.clients)

    def next(self) -> httpx.AsyncClient:
        return next(self._turn)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class OpenAIHttpClient:
    """JSON requests to OpenAI-compatible servers over pooled connections (one instance per event loop)."""

    def __init__(self, connections: int, timeout: float, api_key: str | None = None) -> None:
        self.pools = ConnectionPools(connections, timeout, bearer_headers(api_key))
        self.timeout = timeout

    async def send(self, method: str, url: str, payload: dict[str, Any] | None = None) -> Any:
        """One attempt: the response's JSON; raises Unavailable, InsufficientStorage, HttpStatusError, or ServerError
        (not JSON)."""
        try:
            response = await self.pools.next().request(method, url, json=payload)
        except httpx.ReadTimeout as exc:  # connected, asked, no answer: a queue too deep for a slow server, usually
            raise Unavailable(
                f"{method} {url}: no answer within {self.timeout:g} s (ReadTimeout): the server is busy or stalled; "
                "fewer requests in flight (--concurrency) or a longer --request-timeout let a slow server keep up"
            ) from exc
        except httpx.HTTPError as exc:
            raise Unavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            if response.status_code == INSUFFICIENT_STORAGE:
                message = error_message(response)
                raise InsufficientStorage(f"{method} {url}: HTTP 507: {message}", message)
            if is_retryable_status(response.status_code):
                raise Unavailable(
                    f"{method} {url}: HTTP {response.status_code}: {response.text[:BODY_IN_MESSAGE]}",
                    response.status_code,
                )
            raise HttpStatusError(method, url, response.status_code, response.text)
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServerError(f"{method} {url}: the response is not JSON: {response.text[:200]!r}") from exc

    async def request(self, method: str, url: str, payload: dict[str, Any] | None, policy: RetryPolicy) -> Any:
        """`send` with retries per `policy`; raises GaveUp when every attempt failed."""
        return await with_retries(lambda: self.send(method, url, payload), policy)

    async def aclose(self) -> None:
        await self.pools.aclose()
