"""The built-in hidden-state server: vLLM's extraction protocol (contracts b3-b6) plus real generation, on FastAPI.

`POST /v1/completions` (or chat) with `max_tokens: 1` is a capture: the prompt joins a dynamic batch, the requested
layers' states are written to `<storage>/<request id>.safetensors` under the `.lock` protocol, and the response
carries `kv_transfer_params.hidden_states_path`. Longer `max_tokens` generate (greedy or sampled) without capture.
"""

from __future__ import annotations

import gc
import hmac
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from mtptune.modeling.compile_cache import use_persistent_compile_cache
from mtptune.serving.batching import DynamicBatcher, GenerationBatcher, GenerationRequest, QueueFull
from mtptune.serving.hidden_state_files import (
    HiddenStatesWriteLock,
    remove_abandoned_writes,
    write_hidden_states_file,
)
from mtptune.serving.metrics import ServerMetrics
from mtptune.serving.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body
from mtptune.serving.server_config import ServerConfig
from mtptune.serving.verifier_runtime import Capture, Generation, VerifierRuntime, sample_token

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with `status`."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class HiddenStatesServer:
    def __init__(self, config: ServerConfig, runtime: VerifierRuntime) -> None:
        self.config = config
        self.runtime = runtime
        self.storage_dir = Path(config.storage_dir).resolve()
        self.storage_dir.mkdir(parents=True, exist_ok=True)
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
        max_tokens = self.max_model_len - prompt_len if requested is None else requested
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
        if not self.config.allow_custom_save_path:
            raise Rejected(
                400,
                "kv_transfer_params.hidden_states_path is refused: start the server with "
                "--allow-custom-save-path to let requests choose their file.",
                param="kv_transfer_params",
            )
        path = (self.storage_dir / custom).resolve()
        if not path.is_relative_to(self.storage_dir) or path == self.storage_dir or path.suffix != ".safetensors":
            raise Rejected(
                400,
                f"kv_transfer_params.hidden_states_path {custom!r} must be a *.safetensors file inside "
                f"the storage directory {self.storage_dir}.",
                param="kv_transfer_params",
            )
        if not path.parent.is_dir():
            raise Rejected(
                400,
                f"kv_transfer_params.hidden_states_path {custom!r}: folder {path.parent} does not exist.",
                param="kv_transfer_params",
            )
        return path

    def tokenize(self, text: str) -> list[int]:
        if self.runtime.tokenizer is None:
            raise Rejected(
                400, "This verifier has no tokenizer; send the prompt as a list of token ids.", param="prompt"
            )
        return list(self.runtime.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_chat(self, body: ChatCompletionRequest) -> list[int]:
        tok = self.runtime.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise Rejected(
                400, "This verifier has no chat template; use /v1/completions with a prompt.", param="messages"
            )
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            ids = tok.apply_chat_template(
                messages,
                add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
                continue_final_message=body.continue_final_message,
                tokenize=True,
                return_dict=False,
                **(body.chat_template_kwargs or {}),
            )
        except Exception as exc:  # jinja raises many types for bad messages
            raise Rejected(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    # --- work ----------------------------------------------------------------------------------------------
    async def capture(self, ids: list[int], body: SamplingFields, path: Path) -> int:
        """Batch-forward, then take the file's lock before the caller returns its path and write it in background."""
        try:
            result = await self.batcher.submit(ids)
        except QueueFull as exc:
            raise Rejected(503, f"server overloaded: {exc}; retry later.", "ServiceUnavailableError") from exc
        lock = HiddenStatesWriteLock(path)
        token_ids = torch.as_tensor(ids, dtype=torch.int64)
        forward_done = time.perf_counter()

        def write() -> None:
            try:
                write_hidden_states_file(path, result.hidden_states, token_ids, self.runtime.spec.to_metadata())
                self.metrics.record_file(time.perf_counter() - forward_done)
            except Exception:
                log.exception("writing %s failed", path)
            finally:
                lock.release()

        self.writer_executor.submit(write)
        return sample_token(result.next_token_logits, body.temperature, body.top_p, body.seed)

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Generation]:
        first = requests[0]
        return self.runtime.generate_batch(
            [r.token_ids for r in requests],
            [r.max_tokens for r in requests],
            first.temperature,
            first.top_p,
            first.seed,
        )

    async def generate(self, ids: list[int], body: SamplingFields, max_tokens: int) -> Generation:
        if self.batcher.depth + self.generator.depth >= self.config.max_queue:
            raise Rejected(503, "server overloaded: too many queued requests; retry later.", "ServiceUnavailableError")
        request = GenerationRequest(ids, max_tokens, body.temperature, body.top_p, body.seed)
        try:
            gen = await self.generator.submit(request)
        except QueueFull as exc:
            raise Rejected(503, f"server overloaded: {exc}; retry later.", "ServiceUnavailableError") from exc
        return self.apply_stop(gen, body.stop_strings())

    def apply_stop(self, gen: Generation, stops: list[str]) -> Generation:
        tok = self.runtime.tokenizer
        if not stops or tok is None:
            return gen
        for k in range(1, len(gen.token_ids) + 1):
            if any(s in tok.decode(gen.token_ids[:k], skip_special_tokens=True) for s in stops):
                return Generation(gen.token_ids[:k], "stop")
        return gen

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

        @app.middleware("http")
        async def _guard(request: Request, call_next):
            start = time.perf_counter()
            path = request.url.path
            given = request.headers.get("authorization", "")
            authorized = hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode())
            if path.startswith("/v1") and config.api_key is not None and not authorized:
                return JSONResponse(
                    error_body("Unauthorized: missing or wrong API key.", 401, "AuthenticationError"), 401
                )
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
                return JSONResponse(error_body(f"Request body over {config.max_body_bytes} bytes.", 413), 413)
            response = await call_next(request)
            if path != "/metrics":
                self.metrics.record_request(path, response.status_code, time.perf_counter() - start)
            return response

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

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest) -> dict:
            self.check_model(body.model)
            prompt = body.prompt
            if isinstance(prompt, str):
                ids = self.tokenize(prompt)
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
            return _response("text_completion", request_id, config.model_id, ids, out, choice, kv)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest) -> dict:
            self.check_model(body.model)
            ids = self.render_chat(body)
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
            response = _response("chat.completion", request_id, config.model_id, ids, out, choice, kv)
            if body.return_token_ids:
                response["prompt_token_ids"] = ids
            return response

        return app

    async def _lifespan(self, app: FastAPI):
        self.metrics.watch_gc()
        self.batcher.start()
        self.generator.start()
        log.info(
            "serving %s as %r: layer ids %s, storage %s, max_model_len %d, batch budget %d tokens",
            self.config.model,
            self.config.model_id,
            list(self.config.layer_ids),
            self.storage_dir,
            self.max_model_len,
            self.max_batch_tokens,
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
    if config.kernel_warmup and runtime.device.type == "cuda" and max_rows is not None:
        log.info("warming up the capture kernels for 1..%d requests per forward (--no-kernel-warmup skips)", max_rows)
        seconds = runtime.warm_up_batch_sizes(max_rows, max_tokens=config.batch_tokens_for(runtime.device.type))
        log.info("kernel warm-up took %.1f s", seconds)
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
