"""The OpenAI-compatible HTTP API (FastAPI; needs the ``serve`` extra): parse, call :class:`~cladapt.serve.server.Server`, render.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics``, and the vLLM admin
endpoints ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` plus ``POST /v1/reload``,
which need ``Authorization: Bearer <admin token>`` and are disabled when the server has none.

Errors use OpenAI's body (``{"error": {"message", "type", "param", "code"}}``) with the field
named in ``param``; an unknown ``model`` gets vLLM's 404 body; a full queue gets 503 with
``Retry-After``. One exception handler maps the :class:`~cladapt.errors.CladaptError` hierarchy.

Admission (request -> queued job) is :mod:`cladapt.serve.admission`; response bodies and streams
are :mod:`cladapt.serve.responses`; running under uvicorn is :mod:`cladapt.serve.running`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from cladapt.errors import CladaptError
from cladapt.serve.admission import BadRequest, admit
from cladapt.serve.batching import QueueFull
from cladapt.serve.cache import ModelNotFound
from cladapt.serve.responses import completion_body, events, record, until_done
from cladapt.serve.schemas import (
    ADAPTER_HEADER,
    ChatRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
    error_body,
    model_not_found_body,
    new_id,
)

if TYPE_CHECKING:
    from cladapt.serve.server import Server

logger = logging.getLogger(__name__)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: BaseException) -> Response:
    """The one mapping from errors to HTTP responses."""
    if isinstance(exc, ModelNotFound):
        return _json(404, model_not_found_body(exc.name, exc.why))
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


async def _answer(server: Server, req: CompletionRequest | ChatRequest, endpoint: str) -> Response:
    chat = isinstance(req, ChatRequest)
    job, sink = await admit(server, req)
    headers = {ADAPTER_HEADER: job.label}
    if req.stream:
        return StreamingResponse(events(server, job, sink, chat, req.include_usage(), endpoint),
                                 media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    try:
        result = await until_done(sink)
    finally:
        job.cancelled = not job.finished  # a disconnect cancels this coroutine: stop decoding the row
    record(server, endpoint, job, result)
    return _json(200, completion_body(job, result, chat, new_id("chatcmpl" if chat else "cmpl")), headers)


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
