"""A routing session: one base model, the registry's candidates, a fitted router, routed generation.

The library entry point behind ``cladapt route``, ``cladapt generate --router`` and
``cladapt eval --router``: load the base model the candidates were trained on, fit (or load the
cached state of) the router, embed queries through :class:`cladapt.features.FeatureExtractor`,
and generate with each row's route applied (one adapter, JARe weights, the sum, or Arrow).
Adapters are loaded into one PeftModel on first use and kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cladapt.errors import CladaptError
from cladapt.features import EncoderMissing, FeatureExtractor, load_encoder
from cladapt.serve.routers.base import QueryBatch, Route, RouterConfig
from cladapt.serve.routers.candidates import candidate_records
from cladapt.serve.routers.jare import applied
from cladapt.serve.routers.state import build_router

if TYPE_CHECKING:
    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)


def base_model_of(store: Store, compositions: Sequence[str]) -> str:
    """The base-model id of the newest routable active version."""
    active = [r for r in store.list() if r.status == "active"]
    recs = [r for r in active if r.composition in compositions]
    if not recs:
        others = sorted({r.composition for r in active} & {"route", "sum"})
        hint = (f"its active versions are {'/'.join(others)}-composed: pass --compositions {','.join(others)}"
                if others else "train a task with a routed method first (--method lora)")
        raise CladaptError(f"no active {'/'.join(compositions)}-composed versions in {store.root}", hint=hint)
    return str(max(recs, key=lambda r: r.created).manifest.base_model["id"])


class RoutingSession:
    """Route and answer requests against a registry.

    Args:
        store: the registry.
        router: a name in ``ROUTERS``.
        config: the router's typed config (default: its defaults).
        base_model: override the base model recorded in the candidates.
        compositions: which versions are candidates (``route``; ``sum`` to pick among the
            sum-composed sequence's versions).
        tasks: only these tasks' versions are candidates (default: every task).
        loaded: an already-loaded (model, tokenizer, info) to reuse (benchmarks, tests).
    """

    def __init__(self, store: Store, router: str, *, config: RouterConfig | None = None, base_model: str | None = None,
                 compositions: Sequence[str] = ("route",), tasks: Sequence[str] | None = None,
                 loaded: tuple[Any, Any, Any] | None = None, device: str | None = None) -> None:
        from cladapt.base_model import load

        self.store = store
        base_id = base_model or base_model_of(store, compositions)
        self.model, self.tokenizer, self.info = loaded if loaded is not None else load(base_id, device=device)
        self.router = build_router(store, router, self.info.fingerprint, config=config, compositions=compositions,
                                   tasks=tasks)
        wants_encoder = "encoder" in self.router.spaces
        try:
            encoder = load_encoder(required=wants_encoder, device=device)
        except EncoderMissing as exc:
            raise CladaptError(f"router {router!r} embeds queries with the sentence encoder: {exc}",
                               hint=exc.hint) from exc
        if self.router.needs_model:
            own, _, _ = load(base_id, device=device)  # Arrow wraps its model in place: give it its own copy
            self.router.bind_model(own, self.tokenizer)
        recs = candidate_records(store, self.info.fingerprint, compositions=compositions, tasks=tasks)
        self.records = {f"{r.task}@{r.version}": r for r in recs}
        self.peft_names: dict[str, str] = {ref: rec.peft_name for ref, rec in self.records.items()}
        self.features = FeatureExtractor(self.model, self.tokenizer, encoder=encoder, adapter_loader=self.ensure)

    def ensure(self, ref: str) -> tuple[Any, str]:
        """Load ``ref``'s adapter into the session's PeftModel if needed; returns (model, PEFT name)."""
        from peft import PeftModel

        from cladapt.adapters.loading import attach

        name = self.peft_names.get(ref)
        if name is None:
            raise CladaptError(f"{ref} is not a candidate of this session", hint=f"candidates: {', '.join(self.records)}")
        loaded = isinstance(self.model, PeftModel) and name in self.model.peft_config
        if not loaded:
            self.model, _ = attach(self.model, self.store, self.info, [ref])
            self.features.model = self.model  # the base space must now go through the PeftModel (adapters off)
        return self.model, name

    def close(self) -> Any:
        """Remove every LoRA layer the session added; returns the base model as it was given (for reuse)."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model = self.model.unload()
            self.features.model = self.model
        return self.model

    def route(self, prompts: Sequence[str], *, task_ids: Sequence[str | None] | None = None) -> list[Route]:
        """One route per prompt (each computed from that prompt alone)."""
        return self.router.route(QueryBatch(prompts, self.features, task_ids=task_ids))

    def generate(self, prompts: Sequence[str], routes: Sequence[Route], *, max_new_tokens: int = 64,
                 batch_size: int = 16) -> list[str]:
        """Greedy answers with each row's route applied (rows grouped by how they are applied)."""
        convs = [[{"role": "user", "content": p}] for p in prompts]
        return self.generate_conversations(convs, routes, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def generate_conversations(self, convs: Sequence[list[dict[str, str]]], routes: Sequence[Route], *,
                               max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
        from cladapt.text.generation import generate

        if len(convs) != len(routes):
            raise CladaptError(f"{len(routes)} routes for {len(convs)} requests")
        out: list[str | None] = [None] * len(convs)
        arrow = [i for i, r in enumerate(routes) if r.combine == "arrow"]
        if arrow:
            answers = generate(self.router.model, self.tokenizer, [convs[i] for i in arrow],  # type: ignore[attr-defined]
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
            for i, a in zip(arrow, answers, strict=True):
                out[i] = a
        rest = [i for i, r in enumerate(routes) if r.combine != "arrow"]
        for ref in {ref for i in rest for ref, _ in routes[i].adapters}:
            self.ensure(ref)
        for start in range(0, len(rest), batch_size):
            chunk = rest[start : start + batch_size]
            with applied(self.model, [routes[i] for i in chunk], self.peft_names) as kwargs:
                answers = generate(self.model, self.tokenizer, [convs[i] for i in chunk], max_new_tokens=max_new_tokens,
                                   batch_size=len(chunk), **kwargs)
            for i, a in zip(chunk, answers, strict=True):
                out[i] = a
        return [a if a is not None else "" for a in out]
