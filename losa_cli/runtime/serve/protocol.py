"""The OpenAI wire format: requests as strict pydantic models, responses and errors as plain dicts.

Types are strict (``"max_tokens": "5"`` is refused, not coerced) and unknown fields are refused, as
OpenAI's API does.  Fields OpenAI defines but the lean decoder does not compute (penalties, logprobs,
``n`` > 1, ``echo``, ...) are accepted at their neutral value only: a request that asks for them gets a
400 that names the field, never an answer that silently ignores it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: OpenAI allows at most this many stop sequences
MAX_STOP = 4


class ServeError(Exception):
    """A request the server answers with an HTTP error: its status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: clients (the ``openai`` package among them) read ``error.message``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What completions and chat completions share: the model, the sampling and the stream."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # the range torch.Generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their neutral values only (``unsupported``)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def stops(self) -> tuple[str, ...]:
        """The stop sequences, checked: at most four, none empty."""
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > MAX_STOP or not all(stops):
            raise ServeError(400, f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
        return stops

    def unsupported(self) -> list[tuple[str, bool]]:
        """(field, whether the request asks for it) of what this server does not compute."""
        return [("n", self.n != 1), ("presence_penalty", self.presence_penalty != 0),
                ("frequency_penalty", self.frequency_penalty != 0), ("logit_bias", bool(self.logit_bias))]

    def check_supported(self) -> None:
        for name, asked in self.unsupported():
            if asked:
                raise ServeError(400, f"{name} is not supported by losa serve; leave it at its default", param=name)


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: one prompt, as text or as token ids."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [("echo", self.echo), ("best_of", self.best_of not in (None, 1)),
                                        ("logprobs", self.logprobs is not None), ("suffix", self.suffix is not None)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined), what a chat template takes."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingRequest):
    """``POST /v1/chat/completions``: messages, rendered by the model's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [("logprobs", self.logprobs), ("top_logprobs", self.top_logprobs is not None)]


@dataclass(frozen=True)
class Kind:
    """How completions and chat completions shape the same generation on the wire."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"

    def response(self, rid: str, model: str, text: str, finish: str | None, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": self.object, "created": int(time.time()), "model": model, "choices": [choice],
                "usage": usage}

    def chunk(self, rid: str, model: str, text: str | None, finish: str | None = None,
              usage: dict | None = None, role: bool = False) -> dict:
        """One streamed chunk: a piece of text, or the finish reason (``text`` None), or the usage alone
        (``stream_options.include_usage``: no choices); a chat stream's first chunk names the ``role``."""
        choices: list[dict[str, Any]] = []
        if usage is None:
            if self.chat:
                delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
                choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            else:
                choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        chunk = {"id": rid, "object": self.chunk_object, "created": int(time.time()), "model": model,
                 "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return chunk


COMPLETION = Kind("cmpl", "text_completion", "text_completion", chat=False)
CHAT = Kind("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
