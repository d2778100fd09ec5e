"""The trainer's hidden-state client: many requests in flight, round-robin over servers, retries, validation.

Works against real vLLM (`extract_hidden_states` + `ExampleHiddenStatesConnector`) and `mtptune serve` alike: both
return `kv_transfer_params.hidden_states_path`, and every file goes through `read_hidden_states_file` (b5 lock, b7
checks). A sample is either returned valid or raised, and counted in `stats`; nothing is dropped silently.

Errors that every row would hit are raised at once, never retried (serving/failures.py): a 4xx from the server, a
file of another verifier or other layers, a storage folder the trainer may not read. A full storage folder (HTTP
507) is retried `max_retries` times only. On `close()` the requests still in flight are waited for and their files
deleted, so a run that stops leaves no hidden-state file behind (`--on-generate delete`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from mtptune.errors import ServerError
from mtptune.openai_http import (
    GaveUp,
    HttpStatusError,
    InsufficientStorage,
    OpenAIHttpClient,
    RetryableError,
    RetryPolicy,
    Unavailable,
    bearer_headers,
    normalize_endpoint,
    server_root,
    with_retries,
)
from mtptune.serving.failures import (
    SYSTEMATIC_REASONS,
    ServerStorageFull,
    ServerUnavailable,
    SystematicFailure,
    mismatch_failure,
    permission_denied,
)
from mtptune.serving.hidden_state_files import (
    PARTIAL_SUFFIX,
    HiddenStates,
    HiddenStatesInvalid,
    lock_path_for,
    read_hidden_states_file,
    read_token_ids,
    wait_for_writer,
)

__all__ = ["ClientStats", "HiddenStatesClient", "ServerStorageFull", "ServerUnavailable", "SystematicFailure"]

log = logging.getLogger(__name__)


# Requests kept in flight: an 8192-token step of GSM8K-length rows holds ~40 rows, and a server batches what is in
# flight (the more, the larger and better filled its forwards: the built-in server's length planner groups similar
# lengths out of what waits). 128 rather than 64: emulated, 20 -> 34 rows per forward and 26.5 -> 19.1 % padding on
# GSM8K-length rows (docs/benchmarks.md, issue 18). Long rows are bounded by --prefetch-tokens instead. The trainer's
# --concurrency default.
DEFAULT_CONCURRENCY = 128
# A capture answers in well under a second; a batched server under load, or one still compiling, takes longer.
DEFAULT_REQUEST_TIMEOUT = 120.0
DEFAULT_MAX_RETRIES = 3


@dataclass
class ClientStats:
    requested: int = 0  # fetch() calls
    succeeded: int = 0
    retried: int = 0  # extra attempts made
    failed: int = 0  # fetches that raised after all attempts
    invalid: dict[str, int] = field(default_factory=dict)  # rejected files by HiddenStatesInvalid.reason
    cache_hits: int = 0
    generated: int = 0  # server requests that returned a file
    cached: int = 0  # files moved into cache_dir
    not_cached: int = 0  # --on-generate cache, but deleted instead: the cache folder was full
    reclaimed: int = 0  # files of requests whose answer was lost (the server died), found and deleted on close

    def count_invalid(self, reason: str) -> None:
        self.invalid[reason] = self.invalid.get(reason, 0) + 1


class _InvalidFile(RetryableError):
    """The server's file failed validation; another request may write a good one."""


class _Closed(ServerError):
    """The client is closing: a fetch still in flight stops (its file, if any, is deleted)."""


@dataclass(frozen=True)
class _LostAnswer:
    """A request the server received but never answered (it died, or the answer timed out): the server may still
    have written its file, whose name only the lost answer held."""

    endpoint: str
    token_ids: tuple[int, ...]
    sent_at: float  # wall clock (compared with file mtimes)


# How long `close()` waits for the requests still in flight (their files are deleted once they are answered).
CLOSE_WAIT_S = 30.0


class HiddenStatesClient:
    def __init__(
        self,
        endpoints: list[str],
        model_id: str | None = None,
        num_layers: int = 1,
        hidden_size: int | None = None,
        on_generate: Literal["delete", "cache"] = "delete",
        cache_dir: Path | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        concurrency: int = DEFAULT_CONCURRENCY,
        api_key: str | None = None,
        server_wait_timeout: float = 0.0,
        backoff_base: float = 2.0,
        lock_timeout: float = 10.0,
        backoff_max: float = 5.0,
    ) -> None:
        if not endpoints:
            raise ServerError("no hidden-state server endpoint given (--vllm-endpoint).")
        if on_generate not in ("delete", "cache"):
            raise ServerError(f"on_generate must be 'delete' or 'cache', got {on_generate!r}.")
        if on_generate == "cache" and cache_dir is None:
            raise ServerError("on_generate='cache' needs a cache_dir (--hidden-states-path).")
        self.endpoints = [normalize_endpoint(e) for e in endpoints]
        self.model_id = model_id
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.on_generate = on_generate
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache_full = False  # set at the first ENOSPC moving a file into cache_dir: caching stops
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.concurrency = max(1, concurrency)
        self.api_key = api_key
        self.server_wait_timeout = server_wait_timeout
        self._next_down_warning = 0.0  # rate limit of the "server unavailable, retrying" warning (all fetches)
        self._next_full_warning = 0.0  # the same for "storage full (507)"
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.lock_timeout = lock_timeout
        self.stats = ClientStats()
        self._round_robin = itertools.cycle(range(len(self.endpoints)))
        self._stats_lock = threading.Lock()
        # httpx.AsyncClient and asyncio.Semaphore belong to one event loop; keep one set per loop.
        self._per_loop: dict[asyncio.AbstractEventLoop, tuple[OpenAIHttpClient, asyncio.Semaphore]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._inflight: set[Future] = set()
        self.undeletable: list[str] = []  # server files this client could not delete (permission denied)
        self._lost: list[_LostAnswer] = []
        self._storage_dirs: dict[str, Path] = {}  # endpoint -> the folder its answers' files are in

    @property
    def headers(self) -> dict[str, str]:
        return bearer_headers(self.api_key)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_retries=self.max_retries,
            backoff_base=self.backoff_base,
            backoff_max=self.backoff_max,
            jitter=False,
            wait_timeout=self.server_wait_timeout,
        )

    # --- model check ------------------------------------------------------------------------------------------
    def wait_for_servers(self) -> None:
        """Poll `GET /health` (server root) until each endpoint answers 200 or server_wait_timeout passes."""
        if self.server_wait_timeout <= 0:
            return
        deadline = time.monotonic() + self.server_wait_timeout
        with httpx.Client(timeout=5.0) as http:
            for base in self.endpoints:
                health = server_root(base) + "/health"
                next_note = time.monotonic()
                while True:
                    try:
                        if http.get(health).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    now = time.monotonic()
                    if now > deadline:
                        raise ServerError(
                            f"{health} did not answer 200 within {self.server_wait_timeout:.0f} s; is the server up? "
                            "(a server that is still loading or warming its kernels needs a longer "
                            "--server-wait-timeout)"
                        )
                    if now >= next_note:  # a server start (load, kernel warm-up) can take minutes: say so
                        log.info("waiting for %s (up to %.0f s more)", health, deadline - now)
                        next_note = now + 30.0
                    time.sleep(1.0)

    def check_model(self) -> str:
        """The served model id of every endpoint; raises ServerError when one differs from `model_id` (docs/contracts.md, "Requests and responses")."""
        self.wait_for_servers()
        served = None
        with httpx.Client(timeout=min(self.request_timeout, 30.0), headers=self.headers) as http:
            for base in self.endpoints:
                try:
                    response = http.get(base + "/models")
                except httpx.HTTPError as exc:
                    raise ServerError(
                        f"hidden-state server {base} is unreachable ({type(exc).__name__}: {exc}); start it with "
                        "`mtptune serve MODEL` or fix --vllm-endpoint."
                    ) from exc
                if response.status_code != 200:
                    raise ServerError(f"GET {base}/models returned HTTP {response.status_code}: {response.text[:300]}")
                try:
                    model = response.json()["data"][0]["id"]
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise ServerError(f"GET {base}/models: unexpected body {response.text[:300]!r}") from exc
                if self.model_id is not None and model != self.model_id:
                    raise ServerError(
                        f"{base} serves model {model!r} but the trainer expects {self.model_id!r}; they must match "
                        "character for character. Fix --verifier-name-or-path or the server's --served-model-name."
                    )
                served = model
        return str(served)

    # --- one sample -------------------------------------------------------------------------------------------
    def _cache_path(self, row_id: int) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"hs_{row_id}.safetensors"

    def _read(self, path: str | Path, token_ids: Sequence[int]) -> HiddenStates:
        """Read and check a file, and copy its tensors out of it: safetensors maps the file, and a deleted file
        stays allocated on its disk while a tensor (the memory cache holds them for whole runs) still maps it, so
        `--on-generate delete` would free no space at all (measured: a 64 KiB storage folder full while empty)."""
        states = read_hidden_states_file(path, token_ids, self.num_layers, self.hidden_size, self.lock_timeout)
        return dataclasses.replace(
            states, token_ids=states.token_ids.clone(), hidden_states=states.hidden_states.clone()
        )

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def _count_invalid(self, reason: str) -> None:
        with self._stats_lock:
            self.stats.count_invalid(reason)

    def _state(self) -> tuple[OpenAIHttpClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if loop not in self._per_loop:
            http = OpenAIHttpClient(self.concurrency, self.request_timeout, self.api_key)
            self._per_loop[loop] = (http, asyncio.Semaphore(self.concurrency))
        return self._per_loop[loop]

    async def fetch(self, row_id: int, token_ids: Sequence[int]) -> HiddenStates:
        """Cached file if present and valid, else ask a server (with retries); raises ServerError on failure."""
        self._count(requested=1)
        token_ids = [int(t) for t in token_ids]
        cached = self._cache_path(row_id)
        if cached is not None and cached.exists():
            try:
                states = await asyncio.to_thread(self._read, cached, token_ids)
                self._count(cache_hits=1, succeeded=1)
                return states
            except HiddenStatesInvalid as exc:
                self._count_invalid(exc.reason)
                log.warning("cached %s is invalid (%s); regenerating", cached, exc)
                cached.unlink(missing_ok=True)
        http, semaphore = self._state()

        async def attempt() -> HiddenStates:
            # The slot bounds requests at the servers; reading and checking the file happens after it is free.
            async with semaphore:
                if self._closing.is_set():
                    raise _Closed("the client is closing")
                path = await self._request(http, row_id, token_ids)
            if self._closing.is_set():  # nobody will read it: delete it once the server has written it
                await asyncio.to_thread(self._discard, path)
                raise _Closed("the client is closing")
            return await self._collect(row_id, path, token_ids)

        started = time.monotonic()
        try:
            states = await with_retries(
                attempt,
                self.retry_policy,
                lambda exc, n, waited: self._retrying(row_id, exc, n, waited),
                hurry=self._closing.is_set,
            )
        except GaveUp as exc:
            self._count(failed=1)
            last_error = exc.last.__cause__ or exc.last
            if isinstance(exc.last, InsufficientStorage):
                raise ServerStorageFull(
                    f"hidden-state server {', '.join(self.endpoints)} could not store row {row_id}'s hidden states: "
                    f"HTTP 507 on {exc.attempts} attempts over {time.monotonic() - started:.0f} s (--max-retries "
                    f"{self.max_retries}). The server says:\n{exc.last.server_message}"
                ) from exc.last
            if isinstance(exc.last, Unavailable):
                raise ServerUnavailable(
                    f"hidden-state server {', '.join(self.endpoints)} unavailable: row {row_id} got no answer "
                    f"after {exc.attempts} attempts over {exc.waited_s:.0f} s (--server-wait-timeout "
                    f"{self.server_wait_timeout:g}); last error: {exc.last}"
                ) from last_error
            raise ServerError(
                f"row {row_id}: no valid hidden states after {exc.attempts} attempts; last error: {last_error}"
            ) from last_error
        except _Closed:
            raise
        except ServerError:
            self._count(failed=1)
            raise
        self._count(succeeded=1)
        return states

    def _retrying(self, row_id: int, exc: RetryableError, attempts: int, waited: float) -> None:
        """Before each retry: count it, and say (at most every 30 s, over all fetches) that a server is down."""
        self._count(retried=1)
        log.debug("row %d attempt %d failed: %s", row_id, attempts, exc)
        if isinstance(exc, InsufficientStorage) and (now := time.monotonic()) >= self._next_full_warning:
            self._next_full_warning = now + 30.0
            log.warning(
                "the hidden-state server's storage is full (HTTP 507; row %d, attempt %d of %d, retried up to "
                "--max-retries %d times): %s",
                row_id,
                attempts,
                self.max_retries + 1,
                self.max_retries,
                exc.server_message,
            )
        if isinstance(exc, Unavailable) and (now := time.monotonic()) >= self._next_down_warning:
            self._next_down_warning = now + 30.0
            log.warning(
                "hidden-state server unavailable (%s); retrying for up to %.0f s (--server-wait-timeout)",
                exc,
                max(self.server_wait_timeout - waited, 0.0),
            )

    async def _request(self, http: OpenAIHttpClient, row_id: int, token_ids: list[int]) -> str:
        """One capture request; returns the path of the file the server writes (perhaps still writing)."""
        base = self.endpoints[next(self._round_robin)]
        body = {"prompt": token_ids, "max_tokens": 1, "return_token_ids": True}
        if self.model_id is not None:
            body["model"] = self.model_id
        sent_at = time.time()
        try:
            payload = await http.send("POST", base + "/completions", body)
        except Unavailable as exc:
            # A refused connection never reached the server; any other loss may leave a file behind.
            if exc.status is None and not isinstance(exc.__cause__, httpx.ConnectError):
                with self._stats_lock:
                    self._lost.append(_LostAnswer(base, tuple(token_ids), sent_at))
            raise
        except HttpStatusError as exc:
            # Every row would get the same answer (another vocabulary, a key, a length limit): stop, don't retry.
            raise SystematicFailure(
                f"hidden-state server {base} refused row {row_id}'s request: {exc}\n{refusal_hint(exc)}"
            ) from exc
        try:
            path = payload["kv_transfer_params"]["hidden_states_path"]
        except (KeyError, TypeError) as exc:
            # Every row would get the same answer: stop at the first.
            params = payload.get("kv_transfer_params") if isinstance(payload, dict) else None
            if isinstance(params, dict) and "handle" in params:
                raise SystematicFailure(
                    f"hidden-state server {base} keeps hidden states in a Mooncake store (its answer carries "
                    f"kv_transfer_params.handle {params['handle']!r}, no file path); mtptune's trainer reads files. "
                    "Start the server with `mtptune serve --engine vllm --hidden-states-backend file` (the default)."
                ) from exc
            raise SystematicFailure(
                f"row {row_id}: {base} returned no kv_transfer_params.hidden_states_path; is it a hidden-state "
                f"extraction server (mtptune serve / vllm with extract_hidden_states)? body: "
                f"{json.dumps(payload)[:300]}"
            ) from exc
        echoed = (payload.get("choices") or [{}])[0].get("prompt_token_ids")
        if echoed is not None and list(echoed) != token_ids:
            self._count_invalid("token_mismatch")
            await asyncio.to_thread(self._discard, path)
            # The server tokenised differently: retrying cannot help (docs/contracts.md, "Requests and responses").
            raise HiddenStatesInvalid(
                "token_mismatch", f"row {row_id}: {base} echoed different prompt_token_ids than were sent."
            )
        self._count(generated=1)
        with self._stats_lock:
            self._storage_dirs[base] = Path(path).parent
        return path

    async def _collect(self, row_id: int, path: str, token_ids: list[int]) -> HiddenStates:
        """Wait for the server's file, read and check it, then delete or cache it. A bad file is retried; a file
        that no retry can fix (another verifier's states, a folder the trainer may not read) stops the run."""
        try:
            states = await asyncio.to_thread(self._read, path, token_ids)
        except (HiddenStatesInvalid, OSError) as exc:
            if isinstance(exc, HiddenStatesInvalid):
                self._count_invalid(exc.reason)
            await asyncio.to_thread(self._discard, path)
            if (denied := permission_denied(exc)) is not None:
                raise SystematicFailure(unreadable_storage_message(path, denied)) from exc
            if not isinstance(exc, HiddenStatesInvalid):
                raise
            if exc.reason in SYSTEMATIC_REASONS:
                raise mismatch_failure(exc, self.model_id) from exc
            raise _InvalidFile(str(exc)) from exc
        await asyncio.to_thread(self._dispose, row_id, path)
        return states

    def _discard(self, path: str | os.PathLike) -> None:
        """Delete a server file nobody will use, once its writer is done (else the file would appear after the
        delete). A file this user may not delete is remembered in `undeletable` (reported on close)."""
        # A writer that never finishes, or a lock we may not open: delete what we can anyway.
        with contextlib.suppress(HiddenStatesInvalid, OSError):
            wait_for_writer(path, self.lock_timeout)
        # A server killed mid-write leaves its temp file behind (write_hidden_states_file's `.partial`).
        for leftover in (Path(path), Path(str(path) + PARTIAL_SUFFIX), lock_path_for(path)):
            try:
                leftover.unlink(missing_ok=True)
            except OSError as exc:
                with self._stats_lock:
                    self.undeletable.append(f"{leftover} ({exc.strerror or exc})")

    def _dispose(self, row_id: int, path: str) -> None:
        """After use: delete the server's file, or move it into the cache (docs/contracts.md, "The lock protocol"); always remove the lock. A file this
        user may not remove stops the run (`SystematicFailure`): every file would stay and fill the server's disk."""
        target = self._cache_path(row_id) if self.on_generate == "cache" else None
        try:
            if target is not None and self._cache_full:
                self._count(not_cached=1)
                target = None
            if target is None:
                Path(path).unlink(missing_ok=True)
            else:
                tmp = target.with_name(target.name + ".partial")
                try:
                    shutil.move(path, tmp)  # a rename when on the same file system
                except OSError as exc:
                    tmp.unlink(missing_ok=True)  # copied, but the original could not be removed
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    self._cache_is_full(row_id, exc)
                    Path(path).unlink(missing_ok=True)  # the states are read: the server's file goes as with delete
                else:
                    os.replace(tmp, target)
                    self._count(cached=1)
            lock_path_for(path).unlink(missing_ok=True)
        except PermissionError as exc:
            with self._stats_lock:
                self.undeletable.append(f"{path} ({exc.strerror or exc})")
            raise SystematicFailure(undeletable_storage_message(path, exc)) from exc

    def _cache_is_full(self, row_id: int, exc: OSError) -> None:
        """The cache folder is full: the run goes on (the row's states are in hand; a row that is not cached is
        asked of the server again when next needed), caching stops, and this is said once, loudly."""
        with self._stats_lock:
            first, self._cache_full = not self._cache_full, True
            self.stats.not_cached += 1
        if first:
            free = shutil.disk_usage(self.cache_dir).free if self.cache_dir is not None else 0
            log.warning(
                "the hidden-state cache folder %s is full (%s; %d bytes free): row %d and the rows after it are not "
                "cached (their server files are deleted as with --on-generate delete) and will be asked of the "
                "server again when needed. Free space there, point --hidden-states-path at a larger disk, or pass "
                "--on-generate delete.",
                self.cache_dir,
                exc.strerror or exc,
                free,
                row_id,
            )

    # --- many samples from synchronous code (DataLoader workers, the trainer loop) -----------------------------
    def _background_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="hidden-states-client", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        return self._loop

    def iter_fetch(
        self, items: Iterable[tuple[int, Sequence[int]]], prefetch: int | None = None, max_tokens: int | None = None
    ) -> Iterator[tuple[int, HiddenStates | Exception]]:
        """Yield `(row_id, states or the exception)` in input order, keeping up to `prefetch` rows and `max_tokens`
        of their tokens submitted and not yet yielded (a longer row alone still goes: the memory held ahead is
        bounded by both)."""
        loop = self._background_loop()
        window = prefetch if prefetch is not None else 2 * self.concurrency
        pending: deque[tuple[int, Future, int]] = deque()
        pending_tokens = 0
        iterator = iter(items)
        waiting: tuple[int, Sequence[int]] | None = None  # taken from `items`, not yet submitted: no room for it
        exhausted = False
        while True:
            while not exhausted and len(pending) < max(1, window):
                if self._closing.is_set():  # close() from another thread: submit nothing to a stopping loop
                    exhausted = True
                    break
                if waiting is None:
                    try:
                        waiting = next(iterator)
                    except StopIteration:
                        exhausted = True
                        break
                row_id, token_ids = waiting
                if pending and max_tokens is not None and pending_tokens + len(token_ids) > max_tokens:
                    break
                waiting = None
                fetch = self.fetch(row_id, token_ids)
                try:
                    future = asyncio.run_coroutine_threadsafe(fetch, loop)
                except RuntimeError:  # the loop closed since the check above: close() won the race
                    fetch.close()  # never scheduled: close it, or Python warns it was never awaited
                    if self._closing.is_set():
                        exhausted = True
                        break
                    raise
                with self._stats_lock:
                    self._inflight.add(future)
                future.add_done_callback(self._done)
                pending.append((row_id, future, len(token_ids)))
                pending_tokens += len(token_ids)
            if not pending:
                return
            row_id, future, n_tokens = pending.popleft()
            pending_tokens -= n_tokens
            result: HiddenStates | Exception
            try:
                result = future.result()
            except Exception as exc:  # handed to the caller, who counts/raises per its --on-missing policy
                result = exc
            yield row_id, result

    def _done(self, future: Future) -> None:
        with self._stats_lock:
            self._inflight.discard(future)

    def close(self) -> None:
        """Stop: requests still in flight are waited for (up to CLOSE_WAIT_S) and their files deleted, so that a
        run that stops early leaves no hidden-state file behind; then the connections and the event loop close.
        A second call does nothing."""
        if self._closing.is_set():
            return
        self._closing.set()
        with self._stats_lock:
            inflight = list(self._inflight)
        if inflight:
            _, not_done = concurrent.futures.wait(inflight, timeout=CLOSE_WAIT_S)
            if not_done:
                for future in not_done:  # their loop stops below; a reader waiting on one gets CancelledError
                    future.cancel()
                log.warning(
                    "%d hidden-state requests were still in flight after %.0f s; their files may stay in the "
                    "server's storage folder.",
                    len(not_done),
                    CLOSE_WAIT_S,
                )
        self._reclaim_lost_files()
        if self.undeletable:
            log.warning(
                "%d hidden-state files could not be deleted (this user may not): %s; delete them as the server's user.",
                len(self.undeletable),
                ", ".join(self.undeletable[:5]) + (" ..." if len(self.undeletable) > 5 else ""),
            )
        loop, self._loop = self._loop, None
        if loop is not None:
            state = self._per_loop.pop(loop, None)
            if state is not None:
                asyncio.run_coroutine_threadsafe(state[0].aclose(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            loop.close()
        for other_loop, (http, _) in list(self._per_loop.items()):
            if not other_loop.is_closed() and not other_loop.is_running():
                other_loop.run_until_complete(http.aclose())
        self._per_loop.clear()

    def _reclaim_lost_files(self) -> None:
        """Delete the files of requests whose answer was lost. They are found by what they hold: in the endpoint's
        storage folder, written after the request was sent, with exactly the request's token ids (another client
        sharing the folder is not asking for the same rows at the same time)."""
        with self._stats_lock:
            all_lost, folders = list(self._lost), dict(self._storage_dirs)
        by_folder: dict[Path, list[_LostAnswer]] = {}
        for lost in all_lost:
            if (folder := folders.get(lost.endpoint)) is not None:
                by_folder.setdefault(folder, []).append(lost)
        unknown = len(all_lost) - sum(map(len, by_folder.values()))
        for folder, losses in by_folder.items():
            since = min(lost.sent_at for lost in losses) - 1.0  # 1 s of slack for coarse file-system clocks
            wanted = {lost.token_ids for lost in losses}
            for path in sorted(folder.glob("*.safetensors")):
                try:
                    if path.stat().st_mtime < since or read_token_ids(path) not in wanted:
                        continue
                except (OSError, HiddenStatesInvalid):
                    continue
                self._discard(path)
                self._count(reclaimed=1)
        if self.stats.reclaimed or unknown:
            log.warning(
                "%d hidden-state requests lost their answer (the server died or timed out); %d file(s) they left in "
                "the server's storage folder were found and deleted%s.",
                len(all_lost),
                self.stats.reclaimed,
                f"; {unknown} went to a server that never answered, whose folder is unknown" if unknown else "",
            )

    def __enter__(self) -> HiddenStatesClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refusal_hint(exc: HttpStatusError) -> str:
    """What to do about a 4xx that every row would get."""
    body = exc.body.lower()
    if "vocabulary" in body or "token id" in body:
        return (
            "The prepared data holds token ids the server's verifier does not have: it was tokenized for another "
            "model. Prepare it again with the verifier's tokenizer (mtptune prepare --model VERIFIER), or serve the "
            "verifier the data was made for."
        )
    if exc.status in (401, 403):
        return "The server wants an API key: pass the one it was started with as --api-key (or OPENAI_API_KEY)."
    if exc.status == 404:
        return "Check --vllm-endpoint (the OpenAI base URL, ending in /v1) and --verifier-name-or-path."
    if "max_model_len" in body or "max-model-len" in body or "longer than" in body or exc.status == 413:
        return (
            "The rows are longer than the server accepts: start it with a larger --max-model-len, or train with a "
            "smaller --total-seq-len."
        )
    return "Every row would get the same answer; fix the server's or the trainer's settings named above."


def undeletable_storage_message(path: str | os.PathLike, denied: PermissionError) -> str:
    folder = Path(path).parent
    return (
        f"the trainer may not remove the hidden-state file {path} that the server wrote ({denied.strerror or denied}: "
        f"{denied.filename or path}). The trainer removes each file from the server's storage folder {folder} once it "
        f"has read it (--on-generate delete or cache); without write access for the trainer's user (uid "
        f"{os.getuid()}) every file would stay there and fill the server's disk. Run the server and the trainer as the "
        "same user, or give both one group with read and write access to the folder (and umask 002)."
    )


def unreadable_storage_message(path: str | os.PathLike, denied: PermissionError) -> str:
    folder = Path(path).parent
    return (
        f"the trainer may not read the hidden-state file {path} that the server wrote ({denied.strerror or denied}: "
        f"{denied.filename or path}). The trainer reads each file in the server's storage folder {folder} and then "
        f"deletes it, so that folder must be readable and writable by the trainer's user (uid {os.getuid()}). Run "
        "the server and the trainer as the same user, or give both one group with read and write access to the "
        "folder (and umask 002)."
    )
