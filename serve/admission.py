"""Admission: an OpenAI request becomes a :class:`~cladapt.serve.batching.Job` in the batcher's queue.

Everything a request is refused for is checked here, before it takes a queue slot: options the
server does not honour, ``auto`` without a router, an unknown model (404 from the catalog), an
empty or over-long prompt and ``max_tokens`` over the limits (400 naming the field). A full queue
raises :class:`~cladapt.serve.batching.QueueFull` (503 + ``Retry-After``).

The batcher thread answers through an :class:`AsyncSink`, which hands its events to the request
handler's event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cladapt.errors import CladaptError
from cladapt.serve.batching import Job, QueueFull
from cladapt.serve.engine import Result, Sampling
from cladapt.serve.schemas import ChatRequest, CompletionRequest, PartError

if TYPE_CHECKING:
    from cladapt.serve.server import Server


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



@dataclass
class Prompt:
    """What admission makes of a request's prompt."""

    ids: list[int]
    #: what a router reads: the last user message's text (an ImagePrompt with its images on image requests)
    route_text: str
    field: str  # the request field holding the prompt, for errors
    vision: dict[str, Any] | None = None
    token_extras: dict[str, list[int]] | None = None


def prompt_of(server: Server, req: CompletionRequest | ChatRequest) -> Prompt:
    """The request's prompt as token ids (chat: through the chat template, images through the processor)."""
    try:
        if isinstance(req, ChatRequest):
            if req.image_parts():
                return image_prompt(server, req)
            conv = req.conversation()
            users = [m["content"] for m in conv if m["role"] == "user"]
            return Prompt(server.engine.encode_chat(conv), users[-1] if users else conv[-1]["content"], "messages")
        text = req.prompt_text()
    except PartError as exc:
        raise BadRequest(str(exc), exc.param) from exc
    except ValueError as exc:
        raise BadRequest(str(exc), "messages" if isinstance(req, ChatRequest) else "prompt") from exc
    return Prompt(server.engine.encode_text(text), text, "prompt")


def image_prompt(server: Server, req: ChatRequest) -> Prompt:
    """A chat request with ``image_url`` parts on a vision-language base.

    Parts keep their order (text, image, text ...) in the rendered template; images are decoded
    from data URLs only (a server that fetched URLs would fetch whatever a client names).
    """
    from cladapt.errors import DataError
    from cladapt.image_prompts import ImagePrompt, decode_data_url
    from cladapt.text.template import render
    from cladapt.vision import process, processor_of

    tokenizer = server.engine.tokenizer
    processor = processor_of(tokenizer)
    if processor is None:
        where = req.image_parts()[0]
        raise BadRequest(f"{where}: an image_url part needs a vision-language base model, and "
                         f"{server.served_name} is text-only; send text content", where)
    conv: list[dict[str, Any]] = []
    images: list[Any] = []
    route = ImagePrompt([], [])
    for i, message in enumerate(req.messages):
        content: list[dict[str, Any]] = []
        order: list[tuple[str, Any]] = []
        mine: list[Any] = []
        for j, (kind, value) in enumerate(message.parts(i)):
            if kind == "text":
                content.append({"type": "text", "text": value})
                order.append(("text", value))
                continue
            where = f"messages[{i}].content[{j}].image_url.url"
            try:
                image = decode_data_url(value, where=where)
            except DataError as exc:
                raise BadRequest(str(exc), where) from exc
            content.append({"type": "image"})
            order.append(("image", len(mine)))
            mine.append(image)
        images += mine
        role = "system" if message.role == "developer" else message.role
        conv.append({"role": role, "content": content})
        if role == "user":
            route = ImagePrompt(order, mine)
    got = process(processor, render(tokenizer, conv), images)
    return Prompt(got.input_ids, route, "messages", got.vision, got.token_extras)


def sampling_of(server: Server, req: CompletionRequest | ChatRequest, n_prompt: int, field: str) -> Sampling:
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


async def admit(server: Server, req: CompletionRequest | ChatRequest) -> tuple[Job, AsyncSink]:
    bad = req.unsupported()
    if bad:
        raise BadRequest(bad[1], bad[0])
    auto = req.model == "auto"
    if auto and server.router is None:
        raise BadRequest("model 'auto' routes each request to an adapter, and this server has no router: "
                         "start it with --router NAME (e.g. dtkr, mos, sum) or name an adapter", "model")
    target = None if auto else server.catalog.resolve(req.model)
    if isinstance(req, ChatRequest) and req.image_parts():  # images are decoded and processed off the event loop
        prompt = await asyncio.to_thread(prompt_of, server, req)
    else:
        prompt = prompt_of(server, req)
    sampling = sampling_of(server, req, len(prompt.ids), prompt.field)
    sink = AsyncSink(asyncio.get_running_loop())
    job = Job(model=req.model, prompt_ids=prompt.ids, prompt_text=prompt.route_text, sampling=sampling, sink=sink,
              stream=req.stream, needs_route=auto, vision=prompt.vision, token_extras=prompt.token_extras)
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
