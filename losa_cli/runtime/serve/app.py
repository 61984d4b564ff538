"""The HTTP face: FastAPI routes in OpenAI's shape over the worker (``worker.py``).

A request body over ``--max-body-bytes`` is refused with a 413 before it is read whole (``BodyLimit``).
A request is checked here, before it queues (the served model's name, fields the server does not
compute, the prompt within ``--max-prompt-tokens`` and, with ``max_tokens``, within the model's context
and ``--max-tokens``); any refusal is a 4xx with OpenAI's error object.  A streamed answer is server-sent
events in OpenAI's chunk format, ending ``data: [DONE]``; a failure after the headers went out is one
``data: {"error": ...}`` event, which the ``openai`` client raises as an ``APIError``.  No traceback
ever reaches a response: the server logs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .protocol import (
    CHAT,
    COMPLETION,
    ChatRequest,
    CompletionRequest,
    Kind,
    SamplingRequest,
    ServeError,
    error_body,
    usage,
)
from .worker import Job, Worker

log = logging.getLogger("losa.serve")
#: OpenAI's default max_tokens for /v1/completions (chat's default is the room left in the context)
COMPLETION_MAX_TOKENS = 16
#: seconds between checks that a waiting client is still there
TICK_S = 0.5


@dataclass
class Service:
    """What the routes share: the served model's name and tokenizer, the limits, the worker."""

    name: str
    tokenizer: Any
    worker: Worker
    context: int  # positions the decoder covers: prompt + new tokens
    max_prompt_tokens: int
    max_tokens: int
    max_body_bytes: int
    vocab: int
    created: int

    def completion_job(self, request: CompletionRequest) -> Job:
        self._check(request)
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ServeError(400, f"send one prompt per request (got {len(prompt)})", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"] if prompt else []
        else:
            ids = list(prompt)
            if any(not 0 <= token < self.vocab for token in ids):
                raise ServeError(400, f"prompt token ids must be in 0..{self.vocab - 1}", param="prompt")
        return self._job(request, ids, "prompt", request.max_tokens, COMPLETION_MAX_TOKENS)

    def chat_job(self, request: ChatRequest) -> Job:
        self._check(request)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ServeError(400, f"model {self.name!r} has no chat template (none in its tokenizer files); send the "
                                  "prompt as text to /v1/completions", param="messages", code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - the template's own refusal (e.g. roles must alternate)
            raise ServeError(400, f"the chat template refused the messages: {exc}", param="messages") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._job(request, ids, "messages", request.max_tokens or request.max_completion_tokens, None)

    def _check(self, request: SamplingRequest) -> None:
        if request.model != self.name:
            raise ServeError(404, f"model {request.model!r} is not served here; this server serves {self.name!r}",
                             param="model", code="model_not_found")
        request.check_supported()

    def _job(self, request: SamplingRequest, ids: list[int], param: str, asked: int | None,
             default: int | None) -> Job:
        """The job of a tokenized prompt within the limits; ``default``: max_tokens when none was asked (None:
        the room left in the context), never more than the limits allow."""
        stop = request.stops()
        if not ids:
            raise ServeError(400, "the prompt is empty", param=param)
        if len(ids) > self.max_prompt_tokens:
            raise ServeError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                                  f"{self.max_prompt_tokens} (--max-prompt-tokens)", param=param,
                             code="context_length_exceeded")
        room = self.context - len(ids)
        max_tokens = asked if asked is not None else min(default or room, room, self.max_tokens)
        if max_tokens > self.max_tokens:
            raise ServeError(400, f"max_tokens {max_tokens} exceeds this server's cap of {self.max_tokens} "
                                  "(--max-tokens)", param="max_tokens")
        if max_tokens > room:
            raise ServeError(400, f"this model's context is {self.context} tokens: the prompt's {len(ids)} tokens "
                                  f"+ max_tokens {max_tokens} exceed it; shorten the prompt or lower max_tokens",
                             param="max_tokens", code="context_length_exceeded")
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        return Job(ids, max_tokens, request.temperature, request.top_p, seed, stop, asyncio.get_running_loop())


def build_app(service: Service) -> FastAPI:
    """The application: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``."""
    app = FastAPI(title="losa serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=service.max_body_bytes)

    @app.exception_handler(ServeError)
    async def refused(_: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(*_validation_message(exc.errors())), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return JSONResponse(error_body(str(message), "invalid_request_error"), exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); the server log has the details",
                                       "server_error"), 500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.name, **service.worker.state()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        if model != service.name:
            raise ServeError(404, f"model {model!r} is not served here", param="model", code="model_not_found")
        return _model_card(service)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _answer(service, service.completion_job(body), body, COMPLETION, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await _answer(service, service.chat_job(body), body, CHAT, request)

    return app


def _model_card(service: Service) -> dict:
    return {"id": service.name, "object": "model", "created": service.created, "owned_by": "losa",
            "max_model_len": service.context}


def _validation_message(errors: Any) -> tuple[str, str, str | None]:
    """(message, type, param) of pydantic's first problem, in OpenAI's words for the request's fields."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", \
            "invalid_request_error", None
    if not where:
        return "the request body must be a JSON object", "invalid_request_error", None
    return f"{'.'.join(where)}: {first['msg']}", "invalid_request_error", where[0]


async def _events(job: Job) -> AsyncIterator[tuple | None]:
    """The job's events as they come; None after each ``TICK_S`` without one (time to check the client)."""
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), TICK_S)
        except TimeoutError:
            yield None
            continue
        yield event
        if event[0] != "text":
            return


async def _answer(service: Service, job: Job, body: SamplingRequest, kind: Kind, request: Request) -> Response:
    """Queue the job, then answer whole or as a stream."""
    service.worker.submit(job)
    rid = kind.new_id()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _JobStream(_sse(job, kind, rid, service.name, include_usage), job, service.worker)
    pieces: list[str] = []
    checked = time.monotonic()
    try:
        async for event in _events(job):
            if event is None or time.monotonic() - checked > TICK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it: the job is cancelled below
            elif event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "error":
                raise event[1]
            else:
                return JSONResponse(kind.response(rid, service.name, "".join(pieces), event[1],
                                                  usage(len(job.prompt_ids), event[2])))
    finally:
        service.worker.cancel(job)
    raise AssertionError("the worker ends every job with done or error")  # pragma: no cover


class _JobStream(StreamingResponse):
    """A server-sent event stream whose job is cancelled however the response ends (done, client gone)."""

    def __init__(self, content: AsyncIterator[str], job: Job, worker: Worker) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job, self.worker = job, worker

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.worker.cancel(self.job)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (OpenAI's error object) unread.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read; a chunked body
    is counted as it arrives and refused as soon as it passes the limit.  A body within it is read here (the
    routes read it whole anyway) and handed on."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body ended: nobody to answer
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body: list[dict] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return body.pop() if body else await receive()  # then the client's disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        message = f"the request body is over this server's limit of {self.limit} bytes (--max-body-bytes)"
        response = JSONResponse(error_body(message, "invalid_request_error", code="request_too_large"), 413,
                                headers={"Connection": "close"})  # the rest of the body is never read
        await response(scope, receive, send)


def _data(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _sse(job: Job, kind: Kind, rid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    if kind.chat:
        yield _data(kind.chunk(rid, model, "", role=True))
    async for event in _events(job):
        if event is None:
            yield ": waiting\n\n"  # an SSE comment: clients skip it; a closed connection shows on the write
        elif event[0] == "text":
            yield _data(kind.chunk(rid, model, event[1]))
        elif event[0] == "error":
            yield _data(event[1].body())
        else:
            yield _data(kind.chunk(rid, model, None, finish=event[1]))
            if include_usage:
                yield _data(kind.chunk(rid, model, None, usage=usage(len(job.prompt_ids), event[2])))
    yield _data("[DONE]")
