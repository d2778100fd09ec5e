"""OpenAI/vLLM request bodies the built-in server accepts, validated strictly (a bad body is a 400, never a 500).

Every bound here exists because a value past it would fail later, inside sampling or the file system, where it
would be a 500 and might leave a file behind: the request is refused before any work or file is made.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

# Below this a sampled temperature or top_p overflows or underflows fp32 sampling (1e-40 divides logits into inf,
# top_p 1e-300 rounds to 0 and keeps no token); vLLM samples greedily below the same epsilon.
SAMPLING_EPS = 1e-5
# torch.manual_seed's range: the seed is read as an int64 or a uint64.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# OpenAI's default for /v1/completions; a chat request without max_tokens gets the server's --default-max-tokens.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class RequestKvTransferParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    hidden_states_path: StrictStr | None = None
    include_output_tokens: StrictBool | None = None


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields we do not use

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None  # None: the server's --default-max-tokens (capped by the context left)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, ge=SAMPLING_EPS, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    return_token_ids: StrictBool = False
    kv_transfer_params: RequestKvTransferParams | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature_is_greedy_or_samplable(cls, value: float) -> float:
        if 0.0 < value < SAMPLING_EPS:
            raise ValueError(f"must be 0 (greedy) or at least {SAMPLING_EPS:g}; send 0 for greedy decoding")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(SamplingFields):
    max_tokens: StrictInt | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    # One prompt per request: text, or token ids (docs/contracts.md, "Requests and responses").
    prompt: StrictStr | list[StrictInt] | list[list[StrictInt]] | list[StrictStr]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    max_completion_tokens: StrictInt | None = None
    chat_template: StrictStr | None = None  # vLLM's request template: refused unless --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None


class Rejected(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with `status` (`param` names the field)."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, status: int, kind: str = "BadRequestError", param: str | None = None) -> dict:
    """vLLM's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
