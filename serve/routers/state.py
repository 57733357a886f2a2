"""Build a fitted router for a registry, with its derived state cached per version.

Versions are immutable, so a router's per-version state (DTKR keys, MOS prototypes) is derived
data: it lives in ``<registry>/.work/routers/<router>-<config hash>/<task>__v<N>.{safetensors,json}``,
keyed by the signature's digest. Building a router loads what is cached and fits only versions
that are new (or whose signature changed), one at a time, so adding a task refits incrementally
and leaves earlier versions' files byte-identical. Deleting the folder only costs a refit.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from cladapt.errors import ConfigError, Issue
from cladapt.serve.routers import ROUTERS
from cladapt.serve.routers.base import Router, RouterConfig, TaskView
from cladapt.serve.routers.candidates import task_views

if TYPE_CHECKING:
    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)


def router_config(name: str, overrides: Sequence[str] = ()) -> RouterConfig:
    """The router's typed config from ``key=value`` overrides (YAML values), every problem named."""
    cls = ROUTERS.get(name)
    values: dict[str, Any] = {"name": name}
    issues: list[Issue] = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            issues.append(Issue(f"--set {text}", "expected KEY=VALUE, e.g. --set top_k=2"))
            continue
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            issues.append(Issue(f"--set {text}", f"value is not valid YAML: {exc}"))
    if not issues:
        try:
            return cls.Config.model_validate(values)
        except ValidationError as exc:
            fields = list(cls.Config.model_fields)
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                msg = str(err["msg"])
                if err["type"] == "extra_forbidden":
                    close = difflib.get_close_matches(key, fields, n=1)
                    msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else f"; keys: {', '.join(fields)}")
                issues.append(Issue(f"router {name}: {key}", msg))
    raise ConfigError(issues, title=f"invalid settings for router {name!r}")


def config_key(config: RouterConfig) -> str:
    """Hash of the settings that shape per-version state (top_k only acts at routing time)."""
    blob = json.dumps(config.model_dump(mode="json", exclude={"top_k"}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_folder(store: Store, config: RouterConfig) -> Path:
    return store.work_dir / "routers" / f"{config.name}-{config_key(config)}"


def build_router(
    store: Store,
    name: str,
    base_fingerprint: str,
    *,
    config: RouterConfig | None = None,
    compositions: Sequence[str] = ("route",),
    tasks: Sequence[str] | None = None,
    views: Sequence[TaskView] | None = None,
) -> Router:
    """A router fitted on the registry's candidates (cached state reused, new versions fitted)."""
    cls = ROUTERS.get(name)
    cfg = config if config is not None else cls.Config(name=name)
    router = cls(cfg)
    if views is None:
        views = task_views(store, base_fingerprint, compositions=compositions, with_signatures=cls.needs_signatures,
                           tasks=tasks)
    fit_cached(router, views, cache_folder(store, cfg))
    return router


def _digest(view: TaskView) -> str:
    return view.signature.digest() if view.signature is not None else "no-signature"


def fit_cached(router: Router, views: Sequence[TaskView], folder: Path) -> list[str]:
    """Fit ``router`` on ``views`` in order, reusing cached state; returns the refs fitted anew."""
    fitted: list[str] = []
    for view in views:
        cached = _load(folder, view)
        if cached is not None:
            router.load_version_state(view, *cached)
            continue
        router.fit([view])
        fitted.append(view.ref)
        state = router.version_state(view.ref)
        if state is not None:
            _save(folder, view, router, *state)
    if fitted:
        logger.info("router %s: fitted %s (%d cached)", router.name, ", ".join(fitted), len(views) - len(fitted))
    return fitted


def _load(folder: Path, view: TaskView) -> tuple[dict[str, Any], dict[str, Any]] | None:
    from safetensors.torch import load

    meta_path, blob_path = folder / f"{view.peft_name}.json", folder / f"{view.peft_name}.safetensors"
    try:
        meta = json.loads(meta_path.read_text())
        blob = blob_path.read_bytes()
    except (OSError, ValueError):
        return None
    if meta.get("signature") != _digest(view) or meta.get("sha256") != hashlib.sha256(blob).hexdigest():
        logger.info("router cache for %s is stale; refitting", view.ref)
        return None
    return load(blob), meta.get("state", {})


def _save(folder: Path, view: TaskView, router: Router, tensors: dict[str, Any], state: dict[str, Any]) -> None:
    """Write one version's state atomically (temp file + rename): a crash leaves old or new, never half."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    blob = save(tensors)
    meta = {"ref": view.ref, "router": router.name, "config": router.config.model_dump(mode="json"),
            "signature": _digest(view), "sha256": hashlib.sha256(blob).hexdigest(), "state": state}
    for path, data in ((folder / f"{view.peft_name}.safetensors", blob),
                       (folder / f"{view.peft_name}.json", json.dumps(meta, sort_keys=True).encode())):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
