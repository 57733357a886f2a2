"""Wire formats of the OpenAI-compatible API, the error bodies, and the server's settings.

Requests are validated by pydantic so a wrong type or an out-of-range value becomes a 400 that
names the field (``max_tokens: Input should be greater than or equal to 1``), as OpenAI and vLLM
do. Unknown request fields are ignored (clients send ``user``, ``stream_options`` and friends);
fields cladapt knows but cannot honour (``n > 1``, ``logprobs``, penalties) are refused by name
rather than silently dropped.

Every response says which adapter answered in one documented extra field, ``cladapt``::

    "cladapt": {"adapter": "amazon@3", "requested": "auto", "router": "dtkr", "scores": {...}}

and in the ``X-Cladapt-Adapter`` header (``base`` when no adapter was applied).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ADAPTER_HEADER = "X-Cladapt-Adapter"
BASE_LABEL = "base"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, description="auto, task, task@N, sum, or the base model's name")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default: the server's default)")
    max_completion_tokens: int | None = Field(None, ge=1, description="newer spelling of max_tokens (chat)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def unsupported(self) -> tuple[str, str] | None:
        """(field, reason) of the first option that is valid OpenAI but not served here."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.logprobs not in (None, False, 0):
            return "logprobs", "logprobs are not supported"
        if self.presence_penalty or self.frequency_penalty:
            return ("presence_penalty" if self.presence_penalty else "frequency_penalty"), "penalties are not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(..., description="one prompt (a list of one string is accepted)")
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("exactly one prompt per request")
        return self.prompt[0]

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: a string, or the concatenated text parts of a content list."""
        return "".join(v for kind, v in self.parts(0) if kind == "text")

    def parts(self, index: int) -> list[tuple[str, str]]:
        """``("text", text)`` and ``("image_url", url)`` in order; ``index`` is this message's place in
        ``messages``, for errors that name the part (``messages[1].content[2]``)."""
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [("text", self.content)]
        out = []
        for j, part in enumerate(self.content):
            where = f"messages[{index}].content[{j}]"
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(("text", part["text"]))
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str):
                    raise PartError(f"{where}.image_url.url: a string (a data:image/...;base64 URL) is required",
                                    f"{where}.image_url.url")
                out.append(("image_url", url))
            else:
                raise PartError(f"{where}: content part type {kind!r} is not supported (text and image_url are)",
                                where)
        return out


class PartError(ValueError):
    """A content part the server cannot take; ``param`` names it (``messages[0].content[1]``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)

    def conversation(self) -> list[dict[str, str]]:
        # `developer` is the newer name of `system`; chat templates know only the latter
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def image_parts(self) -> list[str]:
        """Where the request's ``image_url`` parts are (``messages[i].content[j]``), in order."""
        return [f"messages[{i}].content[{j}]" for i, m in enumerate(self.messages) if isinstance(m.content, list)
                for j, part in enumerate(m.content) if part.get("type") == "image_url"]


class LoadLoraRequest(BaseModel):
    """vLLM's runtime adapter loading body."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(..., min_length=1)
    lora_path: str | None = None


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(..., min_length=1)
    lora_int_id: int | None = None


# ---------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: Any = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_not_found_body(name: str, why: str | None = None) -> dict[str, Any]:
    """vLLM's 404 for an unknown ``model`` (flat, ``object: error``), which its clients match on.

    ``why`` follows vLLM's sentence when the name is one cladapt knows but cannot serve now.
    """
    return {
        "object": "error",
        "message": f"The model `{name}` does not exist." + (f" {why}" if why else ""),
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


# ---------------------------------------------------------------------------------- settings


class ServeConfig(BaseModel):
    """``cladapt serve`` settings: ``configs/serve/default.yaml``, then ``--config``, then options."""

    model_config = ConfigDict(extra="forbid")

    base_model: str | None = Field(None, description="base model (default: the one the registry's newest version was trained on)")
    served_model_name: str | None = Field(None, description="the base model's name in /v1/models (default: base_model)")
    router: str | None = Field(None, description="router answering model='auto' (a name from the ROUTERS table)")
    router_config: dict[str, Any] = Field(default_factory=dict, description="settings passed to the router's Config")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = Field(None, description="torch device (default: cpu)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's; 1 on a shared, busy CPU)")
    max_batch_size: int = Field(8, ge=1, description="rows generated together in one batch")
    batch_window_ms: float = Field(10.0, ge=0, description="how long the first request waits for others to join its batch")
    continuous_batching: bool = Field(
        True, description="requests arriving while a batch decodes join it between steps (else they wait for the next batch)"
    )
    max_queue: int = Field(64, ge=1, description="requests admitted but not finished; beyond it: 503 + Retry-After")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with a 503")
    cache_capacity: int = Field(8, ge=1, description="adapters loaded into the serving model at once (LRU beyond)")
    pin: list[str] = Field(default_factory=list, description="adapters loaded at start-up and never evicted")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    max_context: int | None = Field(None, ge=8, description="prompt + completion tokens (default: the model's)")
    resolve_ttl_s: float = Field(
        1.0, ge=0, description="how long a task name's active version is reused before the registry is read again"
    )
    admin_token: str | None = Field(None, description="bearer token of the admin endpoints (none: they are disabled)")
