"""The assembled server: base model + engine, adapter cache, catalog, router, batcher, metrics.

:class:`Server` is the library object behind ``cladapt serve`` (the HTTP layer in
:mod:`cladapt.serve.app` only parses, calls it and renders). It is also the batcher's
:class:`~cladapt.serve.batching.Planner`: it routes ``auto`` requests through the configured
router (``serve/routers``), checks cache capacity and loads adapters.

A router's candidates follow the registry: every ``resolve_ttl_s`` the active routable versions
are compared with the fitted ones, and the difference is removed/fitted incrementally (cached
router state makes a refit cheap), so promote/rollback/new trains reach ``auto`` too.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import CladaptError, ConfigError, Issue
from cladapt.serve.batching import Batcher, Job
from cladapt.serve.cache import AdapterCache, Catalog, Target
from cladapt.serve.engine import Engine
from cladapt.serve.export import HUB_IDS
from cladapt.serve.metrics import Metrics
from cladapt.serve.schemas import ServeConfig

if TYPE_CHECKING:
    from cladapt.registry.store import Store
    from cladapt.serve.routers import Route, Router

logger = logging.getLogger(__name__)



def load_serve_config(files: Sequence[str | Path] = (), **options: Any) -> ServeConfig:
    """``configs/serve/default.yaml``, then each YAML file, then the non-None ``options``.

    Raises:
        ConfigError: every bad key or value, naming the file and key.
    """
    import yaml
    from pydantic import ValidationError

    merged: dict[str, Any] = {}
    sources = [("configs/serve/default.yaml", (resources.files("cladapt.configs") / "serve" / "default.yaml").read_text())]
    issues: list[Issue] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            issues.append(Issue(str(path), "no such config file"))
            continue
        sources.append((str(path), path.read_text()))
    for where, text in sources:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            issues.append(Issue(where, f"not valid YAML: {exc}"))
            continue
        if not isinstance(data, dict):
            issues.append(Issue(where, "expected a mapping of settings"))
            continue
        merged.update(data)
    merged.update({k: v for k, v in options.items() if v is not None and v != () and v != []})
    if not issues:
        try:
            return ServeConfig.model_validate(merged)
        except ValidationError as exc:
            issues += [Issue(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
    raise ConfigError(issues, title="invalid serve settings")


def default_base_model(store: Store) -> str:
    """The base model the registry's newest version was trained on."""
    recs = store.list()
    if not recs:
        raise CladaptError(f"the registry {store.root} is empty", hint="pass --base-model to serve a base model alone")
    return str(max(recs, key=lambda r: r.created).manifest.base_model["id"])


class Server:
    """Everything behind the HTTP routes. ``start()`` starts the batcher; ``close()`` stops it.

    Args:
        config: validated settings.
        store: the registry.
        loaded: an already-loaded ``(model, tokenizer, info)`` (tests, benchmarks).
    """

    def __init__(self, config: ServeConfig, store: Store, *, loaded: tuple[Any, Any, Any] | None = None) -> None:
        from cladapt.base_model import load

        self.config = config
        self.store = store
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        base_id = config.base_model or default_base_model(store)
        model, tokenizer, self.info = loaded if loaded is not None else load(base_id, dtype=config.dtype,
                                                                               device=config.device)
        self.engine = Engine(model, tokenizer, max_context=config.max_context)
        self.served_name = config.served_model_name or self.info.id
        self.scratch = store.work_dir / "serve" / f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
        self.scratch.mkdir(parents=True, exist_ok=True)
        aliases = [HUB_IDS[self.info.id]] if self.info.id in HUB_IDS else []
        self.catalog = Catalog(store, self.info, self.engine, served_name=self.served_name, aliases=aliases,
                               ttl=config.resolve_ttl_s, scratch=self.scratch)
        self.cache = AdapterCache(config.cache_capacity, self.catalog.load, self.catalog.unload)
        self.metrics = Metrics()
        self.router: Router | None = None
        self._router_checked = 0.0
        if config.router:
            self._build_router(config.router)
        self.batcher = Batcher(self.engine, self, max_batch_size=config.max_batch_size,
                               window_s=config.batch_window_ms / 1000, max_queue=config.max_queue,
                               continuous=config.continuous_batching, observe=self.metrics.observe)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Server:
        for name in self.config.pin:
            target = self.catalog.resolve(name)
            if target.key is not None:
                self.cache.pin(target.key)
        self.batcher.start()
        return self

    def close(self) -> None:
        self.batcher.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)

    # ------------------------------------------------------------------ routing

    def _build_router(self, name: str) -> None:
        from cladapt.features import EncoderMissing, FeatureExtractor, load_encoder
        from cladapt.serve.routers import ROUTERS
        from cladapt.serve.routers.state import build_router, router_config

        cls = ROUTERS.get(name)
        if cls.needs_model:
            raise ConfigError([Issue("router", f"{name!r} routes per token inside its own model; "
                                               "`cladapt serve` serves per-request routers")],
                              hint="use dtkr, mos, sum or oracle-free routers; evaluate arrow with `cladapt eval --router`")
        overrides = [f"{k}={json.dumps(v)}" for k, v in self.config.router_config.items()]
        cfg = router_config(name, overrides)
        self._compositions = ("sum",) if name == "sum" else ("route",)
        self.router = build_router(self.store, name, self.info.fingerprint, config=cfg, compositions=self._compositions)
        try:
            encoder = load_encoder(required="encoder" in self.router.spaces, device=self.config.device)
        except EncoderMissing as exc:
            raise CladaptError(f"router {name!r} embeds queries with the sentence encoder: {exc}", hint=exc.hint) from exc
        self.features = FeatureExtractor(self.engine.model, self.engine.tokenizer, encoder=encoder,
                                         adapter_loader=self._feature_adapter)
        self._router_checked = time.monotonic()

    def _feature_adapter(self, ref: str) -> tuple[Any, str]:
        name = self.cache.ensure([ref])[0]
        return self.engine.model, name

    def refresh_router(self, *, force: bool = False) -> list[str]:
        """Follow the registry: drop candidates no longer active, fit new ones; returns the candidates."""
        from cladapt.serve.routers.candidates import candidate_records, task_view
        from cladapt.serve.routers.state import cache_folder, fit_cached

        router = self.router
        if router is None:
            return []
        if not force and time.monotonic() - self._router_checked < self.config.resolve_ttl_s:
            return router.candidates
        self._router_checked = time.monotonic()
        recs = candidate_records(self.store, self.info.fingerprint, compositions=self._compositions)
        refs = [f"{r.task}@{r.version}" for r in recs]
        gone = [ref for ref in router.candidates if ref not in refs]
        if gone:
            router.remove(gone)
        new = [task_view(self.store, r, with_signature=router.needs_signatures) for r, ref in zip(recs, refs, strict=True)
               if ref not in router.tasks]
        if new:
            fit_cached(router, new, cache_folder(self.store, router.config))
        if gone or new:
            logger.info("router %s: -%s +%s", router.name, gone, [v.ref for v in new])
        return router.candidates

    def route(self, jobs: Sequence[Job]) -> None:
        """Planner hook: route the batch's ``auto`` jobs, each row on its own."""
        from cladapt.serve.routers import QueryBatch

        if self.router is None:
            raise CladaptError("no router configured")
        self.refresh_router()
        self.features.model = self.engine.model  # the model object changes when the first adapter loads
        routes = self.router.route(QueryBatch([j.prompt_text for j in jobs], self.features))
        for job, route in zip(jobs, routes, strict=True):
            try:
                target = self.route_target(route)
            except CladaptError as exc:
                self.batcher.fail(job, exc)
                continue
            job.key, job.label, job.needs_route = target.key, target.label, False
            job.route = {"router": self.router.name, **route.to_json()}
            self.metrics.routed.labels(target.label, "auto").inc()

    def route_target(self, route: Route) -> Target:
        if route.combine == "base":
            return Target(None, "base")
        if route.combine == "sum":
            return self.catalog.sum_target(route.refs)
        if route.combine == "mix" and len(route.adapters) == 1:
            ref = route.adapters[0][0]
            return Target(ref, ref, (ref,))
        raise CladaptError(
            f"router {self.router.name if self.router else '?'} chose a {route.combine!r} plan over "
            f"{len(route.adapters)} adapters, which `cladapt serve` does not apply per row",
            hint="serve with router_config top_k=1 (one adapter per request)",
        )

    # ------------------------------------------------------------------ planner

    def room_for(self, keys: set[str]) -> bool:
        return self.cache.room_for(keys)

    def ensure(self, keys: Sequence[str]) -> list[str]:
        try:
            return self.cache.ensure(keys)
        finally:
            self.metrics.sync_cache(self.cache.stats, len(self.cache.loaded()))

    def loaded_name(self, key: str) -> str | None:
        return self.ensure([key])[0] if key in self.cache else None

    # ------------------------------------------------------------------ admin

    def load_lora(self, name: str, path: str | None) -> str:
        """vLLM's load_lora_adapter: a folder under ``name``, or a registry ref; pinned until unloaded."""
        def do() -> str:
            if path is not None:
                if name in self.catalog.loras():
                    raise CladaptError(f"The lora adapter '{name}' has already been loaded.")
                key = self.catalog.add_lora(name, Path(path))
            else:
                target = self.catalog.resolve(name)
                if target.key is None:
                    raise CladaptError(f"{name} is the base model, not an adapter")
                key = target.key
                if key in self.cache.pinned():
                    raise CladaptError(f"The lora adapter '{name}' has already been loaded.")
            try:
                self.cache.pin(key)
            except BaseException:
                if path is not None:
                    self.catalog.remove_lora(name)
                raise
            self.metrics.sync_cache(self.cache.stats, len(self.cache.loaded()))
            return key

        return self.batcher.call(do)

    def unload_lora(self, name: str) -> str:
        def do() -> str:
            if name in self.catalog.loras():
                key = self.catalog.remove_lora(name)
            else:
                key = self.catalog.resolve(name).key or ""
                if key not in self.cache:
                    raise CladaptError(f"The lora adapter '{name}' is not loaded.", hint="GET /v1/models")
            self.cache.evict(key)
            self.metrics.sync_cache(self.cache.stats, len(self.cache.loaded()))
            return key

        return self.batcher.call(do)

    def reload(self) -> dict[str, Any]:
        """Re-read the registry now: names re-resolved, router candidates refitted."""
        def do() -> dict[str, Any]:
            self.catalog.invalidate()
            return {"candidates": self.refresh_router(force=True), "loaded": self.cache.loaded()}

        return self.batcher.call(do)
