"""Settings of the built-in hidden-state server (one typed object built from the CLI)."""

from __future__ import annotations

import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mtptune.serving.request_batching import FORWARD_OVERHEAD_TOKENS

LOAD_FORMATS = ("auto", "dummy")  # vLLM's names: read the checkpoint / random weights from config.json


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now, for a server we start ourselves (demo, tests, benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_hidden_states_path() -> Path:
    """vLLM's connector defaults to the system temp dir; prefer RAM-backed /dev/shm where it exists (docs/contracts.md,
    "Launching vLLM")."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    return base / "mtptune_hidden_states"


@dataclass(frozen=True)
class ServerConfig:
    model: str  # path or hub id as given; also the default served model id (must match the trainer's string)
    layer_ids: tuple[int, ...]
    storage_dir: Path
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_custom_save_path: bool = False
    max_model_len: int | None = None  # None: the verifier's max_position_embeddings
    max_batch_tokens: int | None = None  # padded token slots per capture forward; None: by device (below)
    batch_overhead_tokens: int | None = None  # cost of one more forward, in padded tokens (None: batching's default)
    max_batch_rows: int | None = None  # requests per capture forward; None: by device (below)
    kernel_warmup: str = "auto"  # GPU: a forward per batch size at start; auto: once per machine (warmup_record)
    cudnn: bool = False  # GPU: cuDNN for the verifier's convolutions and SDPA (off: no per-shape plan building)
    gc_freeze: bool = True  # move the objects alive after start-up out of Python's garbage collector (as vLLM)
    cpu_threads: int | None = None  # torch intra-op threads; None: 1 on GPU (unless OMP_NUM_THREADS is set), all on CPU
    batch_window_ms: float = 2.0
    max_generate_batch: int = 32  # rows per batched generation decode
    max_generate_batch_tokens: int = 65536  # padded slots (rows × (prompt + max_tokens)) per generation batch
    max_queue: int = 1024  # waiting requests before 503
    max_tokens_limit: int = 4096  # hard cap on max_tokens per generation request (--max-tokens-limit)
    default_max_tokens: int = 1024  # a request without max_tokens (a chat one, or null) gets at most this many
    trust_request_chat_template: bool = False  # render a template sent with a chat request (it is a program)
    chat_template_timeout: float = 10.0  # seconds a chat template (or a text prompt's tokenization) may take
    writer_threads: int = 4
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None  # default: the verifier folder
    load_format: str = "auto"  # "dummy": random weights from config.json (benchmarks)
    max_body_bytes: int = 64 * 1024 * 1024  # on the bytes read, chunked bodies included (--max-body-bytes)

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model

    def batch_tokens_for(self, device_type: str) -> int:
        """Padded tokens per capture forward: 16k on a GPU (a round of 64 GSM8K-length requests; a GPU forward gains
        nothing from more, and the server warms one forward per 2k tokens of budget at start), 8k on a CPU. The
        measurements behind them: docs/benchmarks.md, "Why the defaults are what they are"."""
        if self.max_batch_tokens is not None:
            return max(self.max_batch_tokens, 1)
        return 16384 if device_type == "cuda" else 8192

    def batch_rows_for(self, device_type: str) -> int | None:
        """Requests per capture forward: 64 on a GPU, where flash-linear-attention tunes some kernels per batch size
        and the server warms every row count up to this bound at start (the bound keeps that finite); unbounded on a
        CPU."""
        if self.max_batch_rows is not None:
            return max(self.max_batch_rows, 1)
        return 64 if device_type == "cuda" else None

    def overhead_tokens_for(self, device_type: str) -> int:
        """What one more forward costs in padded-token equivalents (the length planner splits a round only when that
        saves more padding than this): 2k on a GPU, `FORWARD_OVERHEAD_TOKENS` on a CPU (docs/benchmarks.md, "Why the
        defaults are what they are")."""
        if self.batch_overhead_tokens is not None:
            return max(self.batch_overhead_tokens, 0)
        return 2048 if device_type == "cuda" else FORWARD_OVERHEAD_TOKENS
