"""The built-in hidden-state server: vLLM's extraction protocol (docs/contracts.md, "The hidden-state server") plus real
generation, on FastAPI.

`POST /v1/completions` (or chat) with `max_tokens: 1` is a capture: the prompt joins a dynamic batch, the requested
layers' states are written to `<storage>/<request id>.safetensors` under the `.lock` protocol, and the response
carries `kv_transfer_params.hidden_states_path`. Longer `max_tokens` generate (greedy or sampled) without capture.

Guards (docs/reliability.md): every refusal that can be foreseen (bad fields, a bad save path, a full storage folder)
happens before the forward and before any file exists; chat templates and text prompts are rendered off the event
loop with a time limit (`render_guard`); a client that disconnects cancels its work (`request_guard`).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from transformers import StoppingCriteria, StoppingCriteriaList

from mtptune.modeling.compile_cache import use_persistent_compile_cache
from mtptune.serving.hidden_state_files import (
    PARTIAL_SUFFIX,
    HiddenStatesWriteLock,
    lock_path_for,
    remove_abandoned_writes,
    write_hidden_states_file,
)
from mtptune.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Rejected,
    SamplingFields,
    error_body,
)
from mtptune.serving.render_guard import request_template, run_with_deadline, template_kwargs
from mtptune.serving.request_batching import DynamicBatcher, GenerationBatcher, GenerationRequest, QueueFull
from mtptune.serving.request_guard import RequestGuard, unless_disconnected
from mtptune.serving.save_path import custom_save_path
from mtptune.serving.server_config import ServerConfig
from mtptune.serving.server_metrics import ServerMetrics
from mtptune.serving.storage_space import FULL_ERRNOS, StorageSpace, storage_full
from mtptune.serving.verifier_runtime import (
    NORM_TUNING_TOKENS,
    WARMUP_WIDTHS,
    Capture,
    Generation,
    VerifierRuntime,
    sample_token,
)
from mtptune.serving.warmup_record import record_path, should_warm_up, warmup_fingerprint, write_record

log = logging.getLogger(__name__)

__all__ = ["HiddenStatesServer", "Rejected", "serve"]


class _AbandonedRows(StoppingCriteria):
    """Stops a batched decode's rows whose client has gone (their request future was cancelled), checked once per
    generated token; when every row is abandoned, `generate` returns and the model thread is free again."""

    def __init__(self, requests: list[GenerationRequest], device: torch.device) -> None:
        self.requests = requests
        self.none = torch.zeros(len(requests), dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        flags = [r.abandoned for r in self.requests]
        if not any(flags):
            return self.none
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class HiddenStatesServer:
    def __init__(self, config: ServerConfig, runtime: VerifierRuntime) -> None:
        self.config = config
        self.runtime = runtime
        self.storage_dir = Path(config.storage_dir).resolve()
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.space = StorageSpace(self.storage_dir)
        # A capture file's bytes per prompt token: the captured layers' states plus the int64 token id.
        self.bytes_per_token = len(runtime.layer_ids) * runtime.hidden_size * runtime.dtype.itemsize + 8
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer is not made for concurrent calls
        if removed := remove_abandoned_writes(self.storage_dir):
            log.warning(
                "removed %d abandoned lock/partial file(s) a killed server left in %s", removed, self.storage_dir
            )
        text_config = runtime.model.config.get_text_config()
        self.max_model_len = int(config.max_model_len or getattr(text_config, "max_position_embeddings", 4096))
        # One model thread: torch calls are serialised; file writes overlap with the next forward.
        self.model_executor = ThreadPoolExecutor(1, thread_name_prefix="verifier")
        self.writer_executor = ThreadPoolExecutor(config.writer_threads, thread_name_prefix="hs-writer")
        self.max_batch_tokens = config.batch_tokens_for(runtime.device.type)
        self.batcher: DynamicBatcher[Capture] = DynamicBatcher(
            runtime.capture,
            self.model_executor,
            max_batch_tokens=self.max_batch_tokens,
            window_s=config.batch_window_ms / 1000.0,
            max_queue=config.max_queue,
            overhead_tokens=config.overhead_tokens_for(runtime.device.type),
            max_rows=config.batch_rows_for(runtime.device.type),
        )
        # Concurrent generation requests with the same sampling parameters share one left-padded decode.
        self.generator: GenerationBatcher[Generation] = GenerationBatcher(
            self._generate_batch,
            self.model_executor,
            max_rows=config.max_generate_batch,
            max_batch_tokens=max(config.max_generate_batch_tokens, 1),
            window_s=max(config.batch_window_ms, 20.0) / 1000.0,
            max_queue=config.max_queue,
        )
        self.metrics = ServerMetrics(lambda: self.batcher.depth + self.generator.depth, self.max_batch_tokens)
        self.batcher.on_batch = self.metrics.record_batch
        self.batcher.on_start = self.metrics.record_queue_waits

    # --- request checks ------------------------------------------------------------------------------------
    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.config.model_id:
            raise Rejected(
                404,
                f"The model `{requested}` does not exist; this server serves `{self.config.model_id}`.",
                "NotFoundError",
                "model",
            )

    def check_token_ids(self, ids: list[int]) -> None:
        if not ids:
            raise Rejected(400, "The prompt is empty.", param="prompt")
        vocab = self.runtime.vocab_size
        for pos, tok in enumerate(ids):
            if not 0 <= tok < vocab:
                raise Rejected(
                    400, f"Token id {tok} at prompt position {pos} is out of vocabulary [0, {vocab}).", param="prompt"
                )

    def resolve_max_tokens(self, body: SamplingFields, prompt_len: int, requested: int | None) -> int:
        if prompt_len >= self.max_model_len:
            raise Rejected(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"request has {prompt_len} input tokens. Please reduce the length of the input messages.",
                param="prompt",
            )
        room = self.max_model_len - prompt_len
        max_tokens = min(self.config.default_max_tokens, room) if requested is None else requested
        if max_tokens < 1:
            raise Rejected(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
        if max_tokens > self.config.max_tokens_limit:
            raise Rejected(
                400,
                f"max_tokens={max_tokens} exceeds this server's limit of {self.config.max_tokens_limit}.",
                param="max_tokens",
            )
        if prompt_len + max_tokens > self.max_model_len:
            raise Rejected(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the input, {max_tokens} in "
                "the completion). Please reduce the length of the input or of max_tokens.",
                param="max_tokens",
            )
        if body.n != 1:
            raise Rejected(400, "n must be 1 on this server.", param="n")
        if body.stream:
            raise Rejected(400, "stream=true is not supported by the built-in server.", param="stream")
        return max_tokens

    def output_path(self, request_id: str, body: SamplingFields) -> Path:
        custom = body.kv_transfer_params.hidden_states_path if body.kv_transfer_params else None
        if custom is None:
            return self.storage_dir / f"{request_id}.safetensors"
        return custom_save_path(self.storage_dir, custom, self.config.allow_custom_save_path)

    def _encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return [int(i) for i in self.runtime.tokenizer(text, add_special_tokens=False)["input_ids"]]

    async def tokenize(self, text: str) -> list[int]:
        """A text prompt's ids, tokenized off the event loop (a 64 MiB prompt takes seconds)."""
        if self.runtime.tokenizer is None:
            raise Rejected(
                400, "This verifier has no tokenizer; send the prompt as a list of token ids.", param="prompt"
            )
        return await run_with_deadline(
            lambda: self._encode(text), self.config.chat_template_timeout, "tokenizing the prompt"
        )

    async def render_chat(self, body: ChatCompletionRequest) -> list[int]:
        """The chat's prompt ids: the tokenizer's template (or the request's, if the operator trusts requests),
        rendered and tokenized off the event loop within --chat-template-timeout."""
        tok = self.runtime.tokenizer
        template = request_template(body, self.config.trust_request_chat_template)
        if tok is None or (template is None and not getattr(tok, "chat_template", None)):
            raise Rejected(
                400, "This verifier has no chat template; use /v1/completions with a prompt.", param="messages"
            )
        kwargs = template_kwargs(body, tok)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]

        def render() -> list[int]:
            try:
                text = tok.apply_chat_template(
                    messages,
                    chat_template=template,
                    add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
                    continue_final_message=body.continue_final_message,
                    tokenize=False,
                    **kwargs,
                )
            except Exception as exc:  # jinja raises many types for bad messages
                raise Rejected(400, f"cannot apply the chat template: {exc}", param="messages") from exc
            if not isinstance(text, str):
                raise Rejected(400, "the chat template did not render to text.", param="messages")
            return self._encode(text)

        return await run_with_deadline(render, self.config.chat_template_timeout, "rendering the chat template")

    # --- work ----------------------------------------------------------------------------------------------
    async def capture(self, ids: list[int], body: SamplingFields, path: Path) -> int:
        """Reserve the file's space, batch-forward, sample, then take the file's lock before the caller returns its
        path and write it in background. Every failure that can be foreseen comes before the lock: no file exists
        for a refused request."""
        nbytes = self.space.file_bytes(len(ids), self.bytes_per_token)
        self.space.reserve(nbytes)  # a full storage folder: 507 before the forward
        try:
            try:
                result = await self.batcher.submit(ids)
            except QueueFull as exc:
                raise Rejected(503, f"server overloaded: {exc}; retry later.", "ServiceUnavailableError") from exc
            token = sample_token(result.next_token_logits, body.temperature, body.top_p, body.seed)
            lock = self._lock_for(path)
        except BaseException:
            self.space.release(nbytes)
            raise
        token_ids = torch.as_tensor(ids, dtype=torch.int64)
        forward_done = time.perf_counter()

        def write() -> None:
            written = False
            try:
                write_hidden_states_file(path, result.hidden_states, token_ids, self.runtime.spec.to_metadata())
                written = True
                self.metrics.record_file(time.perf_counter() - forward_done)
            except OSError as exc:
                full = exc.errno in FULL_ERRNOS or exc.errno == errno.EFBIG
                log.error(
                    "writing %s failed: %s%s; its client will find no file",
                    path,
                    exc,
                    f" (the storage folder {self.storage_dir} is full)" if full else "",
                )
            except Exception:
                log.exception("writing %s failed; its client will find no file", path)
            finally:
                lock.release()
                if not written:  # nothing half-written stays behind: no partial file, no lock without data
                    self.metrics.record_file_failure()
                    path.with_name(path.name + PARTIAL_SUFFIX).unlink(missing_ok=True)
                    lock_path_for(path).unlink(missing_ok=True)
                self.space.release(nbytes)

        self.writer_executor.submit(write)
        return token

    def _lock_for(self, path: Path) -> HiddenStatesWriteLock:
        """The file's lock (its first file on disk); a full folder is the 507, anything else a 500 naming it."""
        try:
            return HiddenStatesWriteLock(path)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise storage_full(self.storage_dir, f"cannot create {lock_path_for(path)}: {exc.strerror}") from exc
            raise Rejected(
                500,
                f"cannot create {lock_path_for(path)} in the storage folder {self.storage_dir}: {exc}",
                "InternalServerError",
            ) from exc

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Generation]:
        first = requests[0]
        return self.runtime.generate_batch(
            [r.token_ids for r in requests],
            [r.max_tokens for r in requests],
            first.temperature,
            first.top_p,
            first.seed,
            stopping_criteria=StoppingCriteriaList([_AbandonedRows(requests, self.runtime.device)]),
        )

    async def generate(self, ids: list[int], body: SamplingFields, max_tokens: int) -> Generation:
        if self.batcher.depth + self.generator.depth >= self.config.max_queue:
            raise Rejected(503, "server overloaded: too many queued requests; retry later.", "ServiceUnavailableError")
        request = GenerationRequest(ids, max_tokens, body.temperature, body.top_p, body.seed)
        try:
            gen = await self.generator.submit(request)
        except QueueFull as exc:
            raise Rejected(503, f"server overloaded: {exc}; retry later.", "ServiceUnavailableError") from exc
        stops = body.stop_strings()
        if not stops or self.runtime.tokenizer is None:
            return gen
        return await asyncio.to_thread(self.apply_stop, gen, stops)  # decoding thousands of tokens takes a while

    def apply_stop(self, gen: Generation, stops: list[str]) -> Generation:
        """Cut the generation after the shortest prefix whose text contains a stop string (a binary search over
        prefixes: a prefix's text only grows with it, so a stop once present stays present)."""
        tok = self.runtime.tokenizer

        def stopped(k: int) -> bool:
            with self.tokenizer_lock:
                text = tok.decode(gen.token_ids[:k], skip_special_tokens=True)
            return any(s in text for s in stops)

        if tok is None or not stops or not stopped(len(gen.token_ids)):
            return gen
        low, high = 1, len(gen.token_ids)  # stopped(high) holds
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if stopped(mid) else (mid + 1, high)
        return Generation(gen.token_ids[:high], "stop")

    def detokenize(self, ids: list[int], stops: list[str]) -> str:
        tok = self.runtime.tokenizer
        if tok is None:
            return ""
        text = tok.decode(ids, skip_special_tokens=True)
        for s in stops:
            if s in text:
                text = text[: text.index(s)]
        return text

    async def run(
        self, body: SamplingFields, ids: list[int], request_id: str, max_tokens: int
    ) -> tuple[list[int], str, dict]:
        """Returns (generated ids, finish reason, kv_transfer_params)."""
        self.check_token_ids(ids)
        if max_tokens == 1:
            path = self.output_path(request_id, body)
            token = await self.capture(ids, body, path)
            finish = "stop" if token in self.runtime.eos_token_ids else "length"
            self.metrics.record_tokens(len(ids), 1)
            return [token], finish, {"hidden_states_path": str(path)}
        gen = await self.generate(ids, body, max_tokens)
        self.metrics.record_tokens(len(ids), len(gen.token_ids))
        return gen.token_ids, gen.finish_reason, {}

    async def complete(self, body: CompletionRequest) -> dict:
        """`POST /v1/completions`: a capture (max_tokens 1) or a generation."""
        self.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str):
            ids = await self.tokenize(prompt)
        elif prompt and isinstance(prompt[0], list):
            if len(prompt) != 1:
                raise Rejected(400, "Send one prompt per request (got a batch of prompts).", param="prompt")
            ids = list(prompt[0])
        elif prompt and isinstance(prompt[0], str):
            raise Rejected(400, "Send one prompt per request: a string or a list of token ids.", param="prompt")
        else:
            ids = list(prompt)  # type: ignore[arg-type]
        max_tokens = self.resolve_max_tokens(body, len(ids), body.max_tokens)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        out, finish, kv = await self.run(body, ids, request_id, max_tokens)
        stops = body.stop_strings()
        choice: dict = {
            "index": 0,
            "text": self.detokenize(out, stops),
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }
        if body.return_token_ids:
            choice["prompt_token_ids"] = ids
            choice["token_ids"] = out
        return _response("text_completion", request_id, self.config.model_id, ids, out, choice, kv)

    async def chat(self, body: ChatCompletionRequest) -> dict:
        """`POST /v1/chat/completions`: the rendered chat, then as `complete`."""
        self.check_model(body.model)
        ids = await self.render_chat(body)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self.resolve_max_tokens(body, len(ids), requested)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        out, finish, kv = await self.run(body, ids, request_id, max_tokens)
        choice: dict = {
            "index": 0,
            "message": {"role": "assistant", "content": self.detokenize(out, body.stop_strings())},
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }
        if body.return_token_ids:
            choice["token_ids"] = out
        response = _response("chat.completion", request_id, self.config.model_id, ids, out, choice, kv)
        if body.return_token_ids:
            response["prompt_token_ids"] = ids
        return response

    # --- HTTP ----------------------------------------------------------------------------------------------
    def build_app(self) -> FastAPI:
        app = FastAPI(title="mtptune hidden-state server", lifespan=self._lifespan)
        config = self.config

        @app.exception_handler(Rejected)
        async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
            headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
            return JSONResponse(error_body(exc.message, exc.status, exc.kind, exc.param), exc.status, headers=headers)

        @app.exception_handler(RequestValidationError)
        async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            parts = []
            for err in exc.errors()[:5]:
                loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
                parts.append(f"{loc or 'body'}: {err.get('msg')}")
            return JSONResponse(error_body("Malformed request: " + "; ".join(parts), 400), 400)

        # API key, body size on the bytes read, per-request metrics (outermost: before any body is parsed).
        app.add_middleware(
            RequestGuard,
            max_body_bytes=config.max_body_bytes,
            api_key=config.api_key,
            on_request=self.metrics.record_request,
        )

        @app.get("/health")
        async def health() -> PlainTextResponse:
            return PlainTextResponse("")

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models() -> dict:
            return {
                "object": "list",
                "data": [
                    {
                        "id": config.model_id,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "mtptune",
                        "root": config.model,
                        "max_model_len": self.max_model_len,
                    }
                ],
            }

        # A client that disconnects cancels its request: a queued one leaves the queue, a generation stops.
        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> dict:
            return await unless_disconnected(self.complete(body), request.receive, self.metrics.record_abandoned)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict:
            return await unless_disconnected(self.chat(body), request.receive, self.metrics.record_abandoned)

        return app

    async def _lifespan(self, app: FastAPI):
        self.metrics.watch_gc()
        self.batcher.start()
        self.generator.start()
        log.info(
            "serving %s as %r: layer ids %s, storage %s, max_model_len %d, batch budget %d tokens, "
            "max_tokens %d when a request gives none (--default-max-tokens), at most %d (--max-tokens-limit)%s",
            self.config.model,
            self.config.model_id,
            list(self.config.layer_ids),
            self.storage_dir,
            self.max_model_len,
            self.max_batch_tokens,
            self.config.default_max_tokens,
            self.config.max_tokens_limit,
            "; request chat templates are TRUSTED" if self.config.trust_request_chat_template else "",
        )
        try:
            yield
        finally:
            await self.batcher.stop()
            await self.generator.stop()
            self.writer_executor.shutdown(wait=True)
            self.model_executor.shutdown(wait=False, cancel_futures=True)
            self.metrics.unwatch_gc()


def serve(config: ServerConfig) -> None:
    """Load the verifier and run the server until interrupted (blocking)."""
    use_persistent_compile_cache()  # the kernel warm-up's Triton compilations, kept for the next start
    runtime = VerifierRuntime.load(
        config.model,
        config.layer_ids,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        tokenizer=config.tokenizer,
        load_format=config.load_format,
    )
    threads = config.cpu_threads
    if threads is None and runtime.device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        threads = 1  # as vLLM: CPU work here is small copies; spinning OpenMP workers slow the launching thread
    if threads is not None:
        torch.set_num_threads(max(1, threads))
        log.info("torch CPU threads: %d (--cpu-threads)", torch.get_num_threads())
    if runtime.device.type == "cuda" and not config.cudnn:
        torch.backends.cudnn.enabled = False
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("cuDNN off for the verifier's attention and convolutions (--cudnn turns it on)")
    max_rows = config.batch_rows_for(runtime.device.type)
    if runtime.device.type == "cuda" and max_rows is not None:
        _warm_up_kernels(runtime, config.kernel_warmup, max_rows, config.batch_tokens_for(runtime.device.type))
    server = HiddenStatesServer(config, runtime)
    if config.gc_freeze:
        # As vLLM: everything alive now (the model, its modules, imported libraries) lives as long as the server;
        # moved out of the collector's reach, a full collection no longer walks it while a forward is launching.
        gc.collect()
        gc.freeze()
        log.info(
            "froze %d objects out of the garbage collector's reach (--no-gc-freeze keeps them)", gc.get_freeze_count()
        )
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        log.warning("binding %s without --api-key: anyone who can reach this port can use the verifier", config.host)
    uvicorn.run(server.build_app(), host=config.host, port=config.port, log_level="warning", access_log=False)


def _warm_up_kernels(runtime: VerifierRuntime, mode: str, max_rows: int, max_tokens: int) -> None:
    """One capture forward per row count and token block (`VerifierRuntime.warm_up_batch_sizes`), unless a record
    says it already ran with this configuration and Triton's caches keep what it produced (`warmup_record`)."""
    fingerprint = warmup_fingerprint(
        runtime.model.config.to_dict(), str(runtime.dtype), torch.cuda.get_device_name(runtime.device),
        max_rows=max_rows, max_tokens=max_tokens, widths=list(WARMUP_WIDTHS), token_block=NORM_TUNING_TOKENS,
    )  # fmt: skip
    record = record_path(fingerprint)
    if not should_warm_up(mode, record):
        if mode == "auto":
            log.info("kernel warm-up skipped: it ran on this machine with this verifier architecture and these kernels "
                     "(%s); the compiled kernels and tunings come from Triton's cache (--kernel-warmup always runs "
                     "it)", record)  # fmt: skip
        return
    log.info("warming up the capture kernels for 1..%d requests per forward (--kernel-warmup never skips)", max_rows)
    seconds = runtime.warm_up_batch_sizes(max_rows, max_tokens=max_tokens)
    log.info("kernel warm-up took %.1f s", seconds)
    write_record(record, fingerprint, seconds)


def _response(kind: str, request_id: str, model: str, ids: list[int], out: list[int], choice: dict, kv) -> dict:
    """The OpenAI response body both endpoints share (vLLM adds `kv_transfer_params`)."""
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)},
        "kv_transfer_params": kv or None,
    }
