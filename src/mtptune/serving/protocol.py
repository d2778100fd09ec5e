"""OpenAI/vLLM request bodies the built-in server accepts, validated strictly (a bad body is a 400, never a 500)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class RequestKvTransferParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    hidden_states_path: StrictStr | None = None
    include_output_tokens: StrictBool | None = None


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields we do not use

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=16)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    return_token_ids: StrictBool = False
    kv_transfer_params: RequestKvTransferParams | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(SamplingFields):
    # One prompt per request: text, or token ids (the hidden-state protocol, contracts b3).
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
    chat_template_kwargs: dict[str, Any] | None = None


def error_body(message: str, status: int, kind: str = "BadRequestError", param: str | None = None) -> dict:
    """vLLM's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
