"""The OpenAI-compatible HTTP API (FastAPI; needs the ``serve`` extra): parse, call :class:`~cladapt.serve.server.Server`, render.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics``, and the vLLM admin
endpoints ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` plus ``POST /v1/reload``,
which need ``Authorization: Bearer <admin token>`` and are disabled when the server has none.

Errors use OpenAI's body (``{"error": {"message", "type", "param", "code"}}``) with the field
named in ``param``; an unknown ``model`` gets vLLM's 404 body; a full queue gets 503 with
``Retry-After``. One exception handler maps the :class:`~cladapt.errors.CladaptError` hierarchy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from cladapt.errors import CladaptError
from cladapt.serve.batching import Job, QueueFull
from cladapt.serve.cache import ModelNotFound
from cladapt.serve.engine import Result, Sampling
from cladapt.serve.schemas import (
    ADAPTER_HEADER,
    ChatRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
    error_body,
    model_not_found_body,
    new_id,
    now,
    usage,
)

if TYPE_CHECKING:
    from cladapt.serve.server import Server

logger = logging.getLogger(__name__)


class BadRequest(CladaptError):
    """A request that is well-formed JSON but asks for something invalid; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AsyncSink:
    """Bridges the batcher thread's events into an asyncio queue of the request's handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def _put(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def started(self, job: Job) -> None:
        self._put("started", job)

    def text(self, delta: str) -> None:
        self._put("text", delta)

    def done(self, result: Result) -> None:
        self._put("done", result)

    def failed(self, error: BaseException) -> None:
        self._put("error", error)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: BaseException) -> Response:
    """The one mapping from errors to HTTP responses."""
    if isinstance(exc, ModelNotFound):
        return _json(404, model_not_found_body(exc.name))
    if isinstance(exc, QueueFull):
        return _json(503, error_body(str(exc), type_="service_unavailable", code=503), {"Retry-After": "1"})
    if isinstance(exc, BadRequest):
        return _json(400, error_body(exc.message, param=exc.param, code=400))
    if isinstance(exc, CladaptError):
        message = f"{exc.message} (hint: {exc.hint})" if exc.hint else exc.message
        kind = "invalid_request_error" if exc.http_status < 500 else "server_error"
        return _json(exc.http_status, error_body(message, type_=kind, code=exc.http_status))
    logger.exception("internal error", exc_info=exc)
    return _json(500, error_body(f"internal error: {type(exc).__name__}: {exc}", type_="server_error", code=500))


# ---------------------------------------------------------------------------------- admission


def _prompt_ids(server: Server, req: CompletionRequest | ChatRequest) -> tuple[list[int], str, str]:
    """(token ids, the text the router reads, the field holding the prompt)."""
    try:
        if isinstance(req, ChatRequest):
            conv = req.conversation()
            users = [m["content"] for m in conv if m["role"] == "user"]
            return server.engine.encode_chat(conv), (users[-1] if users else conv[-1]["content"]), "messages"
        text = req.prompt_text()
    except ValueError as exc:
        raise BadRequest(str(exc), "messages" if isinstance(req, ChatRequest) else "prompt") from exc
    return server.engine.encode_text(text), text, "prompt"


def _sampling(server: Server, req: CompletionRequest | ChatRequest, n_prompt: int, field: str) -> Sampling:
    cfg = server.config
    ctx = server.engine.max_context
    if n_prompt == 0:
        raise BadRequest("the prompt is empty", field)
    if n_prompt >= ctx:
        raise BadRequest(f"This model's maximum context length is {ctx} tokens. However, your {field} has "
                         f"{n_prompt} tokens. Please reduce the length of the {field}.", field)
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > cfg.max_tokens_limit:
        raise BadRequest(f"max_tokens {asked} is over this server's limit of {cfg.max_tokens_limit}", "max_tokens")
    if asked is not None and n_prompt + asked > ctx:
        raise BadRequest(f"This model's maximum context length is {ctx} tokens. However, you requested "
                         f"{n_prompt + asked} tokens ({n_prompt} in the {field}, {asked} in the completion). "
                         "Please reduce the length of the messages or completion.", "max_tokens")
    max_tokens = asked if asked is not None else min(cfg.default_max_tokens, ctx - n_prompt)
    return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop_list(),
                    seed=req.seed)


async def _admit(server: Server, req: CompletionRequest | ChatRequest) -> tuple[Job, AsyncSink]:
    bad = req.unsupported()
    if bad:
        raise BadRequest(bad[1], bad[0])
    auto = req.model == "auto"
    if auto and server.router is None:
        raise BadRequest("model 'auto' routes each request to an adapter, and this server has no router: "
                         "start it with --router NAME (e.g. dtkr, mos, sum) or name an adapter", "model")
    target = None if auto else server.catalog.resolve(req.model)
    ids, text, field = _prompt_ids(server, req)
    sampling = _sampling(server, req, len(ids), field)
    sink = AsyncSink(asyncio.get_running_loop())
    job = Job(model=req.model, prompt_ids=ids, prompt_text=text, sampling=sampling, sink=sink, stream=req.stream,
              needs_route=auto)
    if target is not None:
        job.key, job.label = target.key, target.label
        job.route = None
        server.metrics.routed.labels(target.label, "explicit").inc()
    try:
        server.batcher.submit(job)
    except QueueFull:
        server.metrics.rejected.inc()
        raise
    kind, value = await sink.queue.get()
    if kind == "error":
        raise value
    return job, sink


def _extra(job: Job) -> dict[str, Any]:
    return {"adapter": None if job.label == "base" else job.label, "requested": job.model,
            "router": job.route["router"] if job.route else None, "route": job.route}


async def _until_done(sink: AsyncSink) -> Result:
    while True:
        kind, value = await sink.queue.get()
        if kind == "done":
            return value
        if kind == "error":
            raise value


def _record(server: Server, endpoint: str, job: Job, result: Result) -> None:
    server.metrics.prompt_tokens.inc(result.prompt_tokens)
    server.metrics.generation_tokens.inc(result.completion_tokens)
    server.metrics.latency.labels(endpoint).observe(time.perf_counter() - job.enqueued)


# ---------------------------------------------------------------------------------- responses


def _completion_body(job: Job, result: Result, chat: bool, rid: str) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
            "model": job.model, "choices": [choice], "usage": usage(result.prompt_tokens, result.completion_tokens),
            "cladapt": _extra(job)}


def _chunk(job: Job, rid: str, chat: bool, *, delta: str | None = None, finish: str | None = None,
           first: bool = False) -> dict[str, Any]:
    if chat:
        d: dict[str, Any] = {}
        if first:
            d["role"] = "assistant"
        if delta is not None:
            d["content"] = delta
        choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now(),
           "model": job.model, "choices": [choice]}
    if first:
        out["cladapt"] = _extra(job)
    return out


async def _events(server: Server, job: Job, sink: AsyncSink, chat: bool, include_usage: bool,
                  endpoint: str) -> AsyncIterator[str]:
    rid = new_id("chatcmpl" if chat else "cmpl")

    def sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        async for event in _stream(server, job, sink, chat, include_usage, endpoint, rid, sse):
            yield event
    finally:
        job.cancelled = not job.finished  # the client went away: stop decoding its row
    yield "data: [DONE]\n\n"


async def _stream(server: Server, job: Job, sink: AsyncSink, chat: bool, include_usage: bool, endpoint: str,
                  rid: str, sse: Any) -> AsyncIterator[str]:
    yield sse(_chunk(job, rid, chat, delta="" if chat else None, first=True))
    first_token = True
    while True:
        kind, value = await sink.queue.get()
        if kind == "text":
            if first_token:
                server.metrics.first_token.observe(time.perf_counter() - job.enqueued)
                first_token = False
            yield sse(_chunk(job, rid, chat, delta=value))
        elif kind == "done":
            _record(server, endpoint, job, value)
            yield sse(_chunk(job, rid, chat, finish=value.finish_reason))
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": now(), "model": job.model, "choices": [],
                           "usage": usage(value.prompt_tokens, value.completion_tokens)})
            break
        elif kind == "error":
            logger.error("stream failed: %s", value)
            yield sse(error_body(str(value), type_="server_error", code=500))
            break


async def _answer(server: Server, req: CompletionRequest | ChatRequest, endpoint: str) -> Response:
    chat = isinstance(req, ChatRequest)
    job, sink = await _admit(server, req)
    headers = {ADAPTER_HEADER: job.label}
    if req.stream:
        return StreamingResponse(_events(server, job, sink, chat, req.include_usage(), endpoint),
                                 media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    try:
        result = await _until_done(sink)
    finally:
        job.cancelled = not job.finished  # a disconnect cancels this coroutine: stop decoding the row
    _record(server, endpoint, job, result)
    return _json(200, _completion_body(job, result, chat, new_id("chatcmpl" if chat else "cmpl")), headers)


# ---------------------------------------------------------------------------------- the app


def _check_admin(server: Server, request: Request) -> None:
    token = server.config.admin_token
    if not token:
        raise HTTPException(403, "admin endpoints are disabled: start the server with --admin-token "
                                 "(or $CLADAPT_ADMIN_TOKEN) to enable them")
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def _add_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return _json(400, error_body(f"malformed JSON body: {err.get('msg')}", code=400))
        field = ".".join(loc) or None
        return _json(400, error_body(f"{field or 'body'}: {err.get('msg')}", param=field, code=400))

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> Response:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(exc.status_code,
                                                                                                  "invalid_request_error")
        return _json(exc.status_code, error_body(str(exc.detail), type_=kind, code=exc.status_code),
                     dict(exc.headers or {}))

    @app.exception_handler(CladaptError)
    async def _cladapt(_request: Request, exc: CladaptError) -> Response:
        resp = error_response(exc)
        if isinstance(exc, QueueFull):
            resp.headers["Retry-After"] = str(server.config.retry_after_s)
        return resp

    @app.exception_handler(Exception)
    async def _other(_request: Request, exc: Exception) -> Response:
        return error_response(exc)

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        server.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response



def create_app(server: Server) -> FastAPI:
    """The ASGI app serving ``server`` (which the caller starts and closes)."""
    app = FastAPI(title="cladapt", summary="OpenAI-compatible serving of a registry's adapters", version="1")
    app.state.server = server
    _add_handlers(app, server)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        return await _answer(server, req, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Response:
        return await _answer(server, req, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = server.catalog.models(router=server.router.name if server.router else None,
                                     max_len=server.engine.max_context)
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.served_name, "queue": server.batcher.pending,
                "adapters_loaded": server.cache.loaded()}

    @app.get("/metrics")
    async def metrics() -> Response:
        server.metrics.sync_cache(server.cache.stats, len(server.cache.loaded()))
        body, ctype = server.metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(req: LoadLoraRequest, request: Request) -> Response:
        _check_admin(server, request)
        await asyncio.to_thread(server.load_lora, req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(req: UnloadLoraRequest, request: Request) -> Response:
        _check_admin(server, request)
        await asyncio.to_thread(server.unload_lora, req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/v1/reload")
    async def reload(request: Request) -> dict[str, Any]:
        _check_admin(server, request)
        return await asyncio.to_thread(server.reload)

    return app


# ---------------------------------------------------------------------------------- running


KEEP_ALIVE_S = 30


def run(app: FastAPI, host: str, port: int, *, log_level: str = "info") -> None:
    """Serve ``app`` in the foreground until interrupted (Ctrl-C)."""
    import uvicorn

    # keep-alive above uvicorn's 5 s: a client whose pooled connection the server closes while it
    # reuses it gets a ReadError, and queued requests under load can sit idle that long
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S)


class BackgroundServer:
    """``app`` served by uvicorn in a thread on ``host`` and a free port (tests, benchmarks).

    Usage: ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        import socket
        import threading

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                                     timeout_keep_alive=KEEP_ALIVE_S))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)
