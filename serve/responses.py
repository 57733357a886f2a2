"""Response bodies of the completion endpoints: one JSON answer, or server-sent events as tokens come.

Every body carries the ``cladapt`` extra field (which adapter answered, what was asked, the route)
and streams start with a chunk holding it, so a client knows the adapter before the first token.
A client that goes away cancels its row in the running batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from cladapt.serve.admission import AsyncSink
from cladapt.serve.batching import Job
from cladapt.serve.engine import Result
from cladapt.serve.schemas import error_body, new_id, now, usage

if TYPE_CHECKING:
    from cladapt.serve.server import Server

logger = logging.getLogger(__name__)


def _extra(job: Job) -> dict[str, Any]:
    return {"adapter": None if job.label == "base" else job.label, "requested": job.model,
            "router": job.route["router"] if job.route else None, "route": job.route}


async def until_done(sink: AsyncSink) -> Result:
    while True:
        kind, value = await sink.queue.get()
        if kind == "done":
            return value
        if kind == "error":
            raise value


def record(server: Server, endpoint: str, job: Job, result: Result) -> None:
    server.metrics.prompt_tokens.inc(result.prompt_tokens)
    server.metrics.generation_tokens.inc(result.completion_tokens)
    server.metrics.latency.labels(endpoint).observe(time.perf_counter() - job.enqueued)


def completion_body(job: Job, result: Result, chat: bool, rid: str) -> dict[str, Any]:
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


async def events(server: Server, job: Job, sink: AsyncSink, chat: bool, include_usage: bool,
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
            record(server, endpoint, job, value)
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
