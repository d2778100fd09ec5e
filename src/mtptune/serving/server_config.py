"""Settings of the built-in hidden-state server (one typed object built from the CLI)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from mtptune.serving.batching import FORWARD_OVERHEAD_TOKENS

LOAD_FORMATS = ("auto", "dummy")  # vLLM's names: read the checkpoint / random weights from config.json


def default_hidden_states_path() -> Path:
    """vLLM's connector defaults to the system temp dir; prefer RAM-backed /dev/shm where it exists (contracts b1)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    return base / "mtptune_hidden_states"


@dataclass(frozen=True)
class ServerConfig:
    model: str  # path or hub id as given; also the default served model id (b3: must match the trainer's string)
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
    batch_window_ms: float = 2.0
    max_generate_batch: int = 32  # rows per batched generation decode
    max_generate_batch_tokens: int = 65536  # padded slots (rows × (prompt + max_tokens)) per generation batch
    max_queue: int = 1024  # waiting requests before 503
    max_tokens_limit: int = 4096  # hard cap on max_tokens per generation request
    writer_threads: int = 4
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None  # default: the verifier folder
    load_format: str = "auto"  # "dummy": random weights from config.json (benchmarks)
    max_body_bytes: int = 64 * 1024 * 1024

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model

    def batch_tokens_for(self, device_type: str) -> int:
        """Padded tokens per capture forward. On an H100 a transformers forward of a 9B hybrid verifier took
        0.27-0.31 s whether it held 1,800 or 4,200 tokens (launch-bound Python, docs/benchmarks.md 8.2), so a GPU
        forward should be large: 32k tokens is a round of 64 GSM8K-length requests at a few GB of activations."""
        if self.max_batch_tokens is not None:
            return max(self.max_batch_tokens, 1)
        return 32768 if device_type == "cuda" else 8192

    def overhead_tokens_for(self, device_type: str) -> int:
        """What one more forward costs in padded-token equivalents (the length planner splits a round only when
        that saves more padding than this): ~0.27 s of fixed cost per forward on an H100 is ~6k tokens of
        compute at 40 % of the matmul peak; on a CPU a forward is compute-bound and ~1k tokens is right."""
        if self.batch_overhead_tokens is not None:
            return max(self.batch_overhead_tokens, 0)
        return 8192 if device_type == "cuda" else FORWARD_OVERHEAD_TOKENS
