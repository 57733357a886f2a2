"""``cladapt proxy``: a routing front for vLLM (or ``cladapt serve``) that speaks the OpenAI API on both sides.

For each completion/chat request it: resolves ``model`` (``auto`` through the router, ``task`` /
``task@N`` to the explicit version, the base model's name to itself); picks an upstream with
adapter affinity (rendezvous hashing, so an adapter keeps landing where it is already loaded and
adding an upstream moves only its share); makes sure the adapter is loaded there
(``POST /v1/load_lora_adapter`` with a folder written by the same code as ``export --vllm``, so its
``base_model_name_or_path`` is the id vLLM serves); rewrites ``model`` to the adapter's versioned
name (``amazon@3``: a promote loads a new name instead of serving stale weights); and streams the
answer through unchanged, adding ``X-Cladapt-Adapter``.

``model: "sum"`` is the composed sum of the registry's active sum-composed versions (O-LoRA,
InC-LoRA, ...), as ``cladapt serve`` answers it. vLLM applies one LoRA per request and cannot
compose adapters itself, so the proxy writes the sum as one rank-concatenated adapter (the
``export --merged`` folder: exact, rank = the sum of the parts' ranks) and loads it upstream under
a name that changes with the set of versions (``sum-<hash>``). The upstream's ``--max-lora-rank``
must hold that rank; a sum over vLLM's largest rank is refused with a 400 naming it.

An upstream that answers 404 for an adapter it had loaded (it restarted) gets it loaded again and
the request is retried once. Upstream failures become 502 with an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cladapt.errors import CladaptError
from cladapt.serve.metrics import Metrics
from cladapt.serve.schemas import ADAPTER_HEADER, error_body, model_not_found_body

if TYPE_CHECKING:
    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)


class ProxyConfig(BaseModel):
    """``cladapt proxy`` settings."""

    model_config = ConfigDict(extra="forbid")

    upstreams: list[str] = Field(..., min_length=1, description="base URLs of OpenAI-compatible servers (vLLM)")
    router: str | None = Field(None, description="router answering model='auto'")
    router_config: dict[str, Any] = Field(default_factory=dict)
    base_model_id: str | None = Field(None, description="the model id the upstreams serve (default: asked upstream)")
    adapter_dir: Path | None = Field(None, description="where adapters are written for the upstreams to read "
                                                       "(must be visible to them; default: <registry>/.work/proxy)")
    upstream_api_key: str | None = Field(None, description="bearer token sent upstream (vLLM --api-key)")
    timeout_s: float = Field(600.0, gt=0)
    resolve_ttl_s: float = Field(1.0, ge=0)


class UpstreamError(CladaptError):
    http_status = 502


def rendezvous(key: str, upstreams: list[str]) -> str:
    """The upstream with the highest hash for ``key``: stable, and balanced across keys."""
    return max(upstreams, key=lambda u: hashlib.sha256(f"{u}|{key}".encode()).digest())


class Proxy:
    """The routing state: registry, optional router, and which adapters each upstream holds."""

    def __init__(self, config: ProxyConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.upstreams = [u.rstrip("/") for u in config.upstreams]
        self.adapter_dir = config.adapter_dir or store.work_dir / "proxy"
        self.loaded: dict[str, set[str]] = {u: set() for u in self.upstreams}
        self.metrics = Metrics(prefix="cladapt_proxy")
        self.base_model: str | None = config.base_model_id
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._resolved: dict[str, tuple[float, str]] = {}
        self._sums: dict[str, tuple[str, ...]] = {}  # sum-<hash> -> the versions it composes
        self.router: Any = None
        self.features: Any = None
        self.vision = False  # the router's base is a vision-language model: it routes on images too
        headers = {"Authorization": f"Bearer {config.upstream_api_key}"} if config.upstream_api_key else {}
        self.client = httpx.AsyncClient(timeout=config.timeout_s, headers=headers)

    # ------------------------------------------------------------------ names

    async def served_model(self) -> str:
        """The base model id the upstreams serve (asked once from the first upstream's /v1/models)."""
        if self.base_model is None:
            r = await self.client.get(self.upstreams[0] + "/v1/models")
            r.raise_for_status()
            roots = [m["id"] for m in r.json()["data"] if not m.get("parent")]
            if not roots:
                raise UpstreamError(f"{self.upstreams[0]} lists no base model")
            self.base_model = roots[0]
        return self.base_model

    def resolve(self, name: str) -> str:
        """``task`` / ``task@N`` -> the explicit ref (cached for ``resolve_ttl_s``)."""
        from cladapt.registry.refs import AdapterRef
        from cladapt.serve.cache import ModelNotFound

        hit = self._resolved.get(name)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        try:
            rec = self.store.get(AdapterRef.parse(name))
        except CladaptError as exc:
            raise ModelNotFound(name, hint=exc.hint) from exc
        ref = f"{rec.task}@{rec.version}"
        self._resolved[name] = (time.monotonic() + self.config.resolve_ttl_s, ref)
        return ref

    def resolve_sum(self) -> str:
        """``sum`` -> ``sum-<hash>``: the active sum-composed versions on the newest one's base model."""
        from cladapt.serve.cache import SUM_MISSING, ModelNotFound

        recs = [r for r in self.store.list() if r.status == "active" and r.composition == "sum"]
        if not recs:
            raise ModelNotFound("sum", why=SUM_MISSING)
        newest = max(recs, key=lambda r: r.created)
        recs = sorted((r for r in recs if r.base_fingerprint == newest.base_fingerprint),
                      key=lambda r: (r.created, r.task, r.version))
        refs = tuple(f"{r.task}@{r.version}" for r in recs)
        key = "sum-" + hashlib.sha256("|".join(refs).encode()).hexdigest()[:12]
        self._sums[key] = refs
        return key

    def route(self, text: str) -> tuple[str, dict[str, Any]]:
        """Route one request's text; returns (explicit ref, the route as JSON)."""
        from cladapt.serve.routers import QueryBatch

        if self.router is None:
            raise CladaptError("model 'auto' needs a router: start the proxy with --router NAME")
        route = self.router.route(QueryBatch([text], self.features))[0]
        if route.combine != "mix" or len(route.adapters) != 1:
            raise CladaptError(f"a {route.combine!r} route over {len(route.adapters)} adapters cannot be sent to "
                               "an engine that applies one LoRA per request", hint="use router_config top_k=1")
        return route.adapters[0][0], route.to_json()

    # ------------------------------------------------------------------ upstream adapters

    def _folder(self, ref: str, base: str) -> Path:
        """The adapter as vLLM wants it (written once per ref and served model id)."""
        from cladapt.serve.export import write_adapter

        # per served model: the folder's base_model_name_or_path must be the upstream's model id
        tag = hashlib.sha256(base.encode()).hexdigest()[:8]
        folder = (self.adapter_dir / f"{ref.replace('@', '-v')}-{tag}").absolute()
        if not (folder / "adapter_config.json").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if ref in self._sums:
                self._write_sum(ref, tmp, base)
            else:
                write_adapter(self.store, self.store.get(ref), tmp, base)
            tmp.rename(folder)
        return folder

    def _write_sum(self, key: str, folder: Path, base: str) -> None:
        """The rank-concatenated sum as one adapter folder (refused when vLLM cannot hold its rank)."""
        from cladapt.adapters.loading import write_merged
        from cladapt.serve.export import vllm_rank

        refs = self._sums[key]
        ranks = write_merged(self.store, [self.store.get(r) for r in refs], folder, base)
        total = max(ranks.values(), default=0)
        try:
            vllm_rank(total)
        except CladaptError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise CladaptError(f"model 'sum': the sum of {', '.join(refs)} has rank {total}, over vLLM's largest "
                               "--max-lora-rank", hint="serve it with `cladapt serve` (which applies the sum "
                               "itself) or retire versions from the sum") from exc

    async def ensure_loaded(self, upstream: str, ref: str, *, force: bool = False) -> None:
        lock = self._locks.setdefault((upstream, ref), asyncio.Lock())
        async with lock:
            if ref in self.loaded[upstream] and not force:
                return
            folder = await asyncio.to_thread(self._folder, ref, await self.served_model())
            r = await self.client.post(upstream + "/v1/load_lora_adapter",
                                       json={"lora_name": ref, "lora_path": str(folder)})
            if r.status_code != 200 and "already been loaded" not in r.text:
                raise UpstreamError(f"{upstream} refused to load {ref}: HTTP {r.status_code} {r.text[:300]}")
            self.loaded[upstream].add(ref)
            logger.info("loaded %s on %s", ref, upstream)

    async def close(self) -> None:
        await self.client.aclose()


def build_proxy(config: ProxyConfig, store: Store) -> Proxy:
    """A proxy with its router fitted (when one is configured)."""
    proxy = Proxy(config, store)
    if config.router:
        from cladapt.base_model import load
        from cladapt.features import FeatureExtractor, load_encoder
        from cladapt.serve.routers.session import base_model_of
        from cladapt.serve.routers.state import build_router, router_config
        from cladapt.vision import processor_of

        overrides = [f"{k}={json.dumps(v)}" for k, v in config.router_config.items()]
        cfg = router_config(config.router, overrides)
        router_base = base_model_of(store, ("route",))
        model, tok, info = load(router_base)  # routers embed queries with the base model on the proxy's host
        proxy.router = build_router(store, config.router, info.fingerprint, config=cfg)
        encoder = load_encoder(required="encoder" in proxy.router.spaces)
        proxy.features = FeatureExtractor(model, tok, encoder=encoder)
        proxy.vision = processor_of(tok) is not None
    return proxy


# ---------------------------------------------------------------------------------- HTTP


def _prompt_text(body: dict[str, Any], *, vision: bool = False) -> str:
    """What the router reads: the last user message's text, with its data-URL images when the
    router's base is a vision-language model (an :class:`~cladapt.image_prompts.ImagePrompt`).

    Content parts go upstream unchanged either way; a remote image URL is the upstream's to fetch,
    and the route is then made on the message's text and inline images.
    """
    if "messages" not in body:
        text = body.get("prompt", "")
        text = text[0] if isinstance(text, list) and text else text
        if not isinstance(text, str):
            raise CladaptError("prompt: a string is required")
        return text
    messages = body["messages"] if isinstance(body["messages"], list) else []
    users = [(i, m.get("content")) for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return ""
    index, content = users[-1]
    if isinstance(content, str) or content is None:
        return content or ""
    if not isinstance(content, list):
        raise CladaptError(f"messages[{index}].content: a string or a list of content parts is required")
    from cladapt.image_prompts import ImagePrompt, decode_data_url

    order: list[tuple[str, Any]] = []
    images: list[Any] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            order.append(("text", part["text"]))
        elif kind == "image_url" and vision:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str) and url.startswith("data:"):
                order.append(("image", len(images)))
                images.append(decode_data_url(url, where=f"messages[{index}].content[{j}].image_url.url"))
    return ImagePrompt(order, images)


async def _plan(proxy: Proxy, body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """(adapter ref or None for the base model, route JSON for auto)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise CladaptError("model: a string is required")
    base = await proxy.served_model()
    if model in (base, "base"):
        return None, None
    if model == "auto":
        return await asyncio.to_thread(lambda: proxy.route(_prompt_text(body, vision=proxy.vision)))
    if model == "sum":
        key = await asyncio.to_thread(proxy.resolve_sum)
        return key, {"combine": "sum", "refs": list(proxy._sums[key])}
    return proxy.resolve(model), None


async def _send(proxy: Proxy, path: str, body: dict[str, Any], ref: str | None) -> httpx.Response:
    upstream = rendezvous(ref or "__base__", proxy.upstreams)
    out = {**body, "model": ref or await proxy.served_model()}
    for attempt in (0, 1):
        if ref is not None:
            await proxy.ensure_loaded(upstream, ref, force=attempt == 1)
        req = proxy.client.build_request("POST", upstream + path, json=out)
        resp = await proxy.client.send(req, stream=True)
        if resp.status_code == 404 and ref is not None and attempt == 0:
            await resp.aclose()  # the upstream forgot the adapter (a restart): load it again and retry once
            proxy.loaded[upstream].discard(ref)
            continue
        return resp
    raise AssertionError("unreachable")


async def _forward(proxy: Proxy, request: Request, path: str) -> Response:
    """One completion request: plan, send upstream, relay the answer (streamed or not) with the adapter named."""
    from cladapt.serve.cache import ModelNotFound

    t0 = time.perf_counter()
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise CladaptError("the body must be a JSON object")
        ref, route = await _plan(proxy, body)
        resp = await _send(proxy, path, body, ref)
    except ModelNotFound as exc:
        return JSONResponse(model_not_found_body(exc.name, exc.why), status_code=404)
    except json.JSONDecodeError as exc:
        return JSONResponse(error_body(f"malformed JSON body: {exc}", code=400), status_code=400)
    except httpx.HTTPError as exc:
        return JSONResponse(error_body(f"upstream unreachable: {exc}", type_="server_error", code=502), 502)
    except CladaptError as exc:
        return JSONResponse(error_body(exc.message, type_="invalid_request_error" if exc.http_status < 500
                                       else "server_error", code=exc.http_status), exc.http_status)
    label = ref or "base"
    proxy.metrics.routed.labels(label, "auto" if body["model"] == "auto" else "explicit").inc()
    headers = {ADAPTER_HEADER: label}
    ctype = resp.headers.get("content-type", "application/json")
    if ctype.startswith("text/event-stream"):
        async def relay() -> Any:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()
                proxy.metrics.latency.labels(path).observe(time.perf_counter() - t0)

        return StreamingResponse(relay(), status_code=resp.status_code, media_type=ctype, headers=headers)
    raw = await resp.aread()
    await resp.aclose()
    proxy.metrics.latency.labels(path).observe(time.perf_counter() - t0)
    if resp.status_code == 200 and ctype.startswith("application/json"):
        data = json.loads(raw)
        data["model"] = body["model"]
        data["cladapt"] = {"adapter": ref, "requested": body["model"], "route": route}
        return JSONResponse(data, headers=headers)
    return Response(raw, status_code=resp.status_code, media_type=ctype, headers=headers)


def create_proxy_app(proxy: Proxy) -> FastAPI:
    """The proxy's ASGI app."""
    app = FastAPI(title="cladapt proxy", version="1")
    app.state.proxy = proxy

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _forward(proxy, request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _forward(proxy, request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        base = await proxy.served_model()
        data = [{"id": base, "object": "model", "owned_by": "cladapt", "root": base, "parent": None}]
        for rec in proxy.store.list():
            if rec.status == "active":
                data.append({"id": rec.task, "object": "model", "owned_by": "cladapt", "parent": base,
                             "root": f"{rec.task}@{rec.version}"})
        summed = [f"{r.task}@{r.version}" for r in proxy.store.list() if r.status == "active" and r.composition == "sum"]
        if summed:
            data.append({"id": "sum", "object": "model", "owned_by": "cladapt", "parent": base, "root": "sum",
                         "cladapt": {"kind": "sum", "refs": summed}})
        if proxy.router is not None:
            data.append({"id": "auto", "object": "model", "owned_by": "cladapt", "parent": base, "root": "auto"})
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "upstreams": {u: sorted(s) for u, s in proxy.loaded.items()}}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = proxy.metrics.render()
        return Response(body, media_type=ctype)

    return app
