"""The settings of `mtptune regenerate` (how to sample, how to talk to the server): the defaults of the CLI and of
`mtptune.data.regenerate.regenerate`, in a module light enough to import when the CLI is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtptune.openai_http import RetryPolicy


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 2048
    seed: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None


DEFAULT_SAMPLING = SamplingConfig()


@dataclass(frozen=True)
class ClientConfig:
    endpoint: str = "http://localhost:8000/v1"  # OpenAI base URL
    model: str | None = None  # served model id; None: the first of GET /models
    api_key: str | None = None
    concurrency: int = 64
    max_retries: int = 3
    timeout_s: float = 600.0
    backoff_s: float = 0.5

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(max_retries=self.max_retries, backoff_base=self.backoff_s, jitter=True)
