"""AdapterCache: a bounded LRU of the adapters loaded into the serving model, with pinning.

One tier only: an adapter is either a PEFT adapter inside the serving ``PeftModel`` or on disk in
the registry. Loading one takes ~0.1 s on CPU and holds a few MB, so the bound is about how many
adapters a batch may mix (and memory on large bases), not about disk.

The cache knows nothing about PEFT or the registry: it is given a ``load(key) -> peft_name`` and an
``unload(peft_name)`` callback, so its state machine is tested on its own. Keys are the server's
names for things it can load: ``amazon@3`` (an explicit registry version), ``sum[<hash>]`` (the
composed sum of a given set of versions, built once) and ``lora:<name>`` (a folder loaded through
the admin endpoint, pinned until unloaded).

:class:`Catalog` is the other half: it maps what a request names (``amazon``, ``amazon@3``,
``sum``, the base model's name, a runtime-loaded name) to a cache key, and loads a key into the
engine (registry files verified against their sha256 first). A task name is re-resolved to its
active version at most every ``ttl`` seconds, so a promote, a rollback or a new train is served
without a restart: the new version is a new key, loaded on first use, and the old one ages out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import CapacityError, CladaptError, IncompatibleBaseModel, NotFound, RegistryError

if TYPE_CHECKING:
    from cladapt.base_model import BaseModelInfo
    from cladapt.registry.store import Store
    from cladapt.serve.engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterCache:
    """LRU over loaded adapters; pinned ones are never evicted.

    Not thread-safe on its own: the server calls it under the engine lock.
    """

    def __init__(
        self,
        capacity: int,
        load: Callable[[str], str],
        unload: Callable[[str], None],
        *,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._load = load
        self._unload = unload
        self._on_evict = on_evict
        self._entries: OrderedDict[str, str] = OrderedDict()  # key -> peft name, least recent first
        self._pinned: set[str] = set()
        self.stats = CacheStats()

    # ------------------------------------------------------------------ queries

    def loaded(self) -> list[str]:
        """Loaded keys, least recently used first."""
        return list(self._entries)

    def pinned(self) -> set[str]:
        return set(self._pinned)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def peft_name(self, key: str) -> str | None:
        return self._entries.get(key)

    def room_for(self, keys: Iterable[str]) -> bool:
        """Whether ``keys`` can be loaded at once (pinned adapters outside them keep their slots)."""
        wanted = set(keys)
        return len(wanted | self._pinned) <= self.capacity

    # ------------------------------------------------------------------ changes

    def ensure(self, keys: Iterable[str]) -> list[str]:
        """Make every key loaded; returns their PEFT names in the given order.

        Evicts least recently used unpinned adapters that are not among ``keys``.

        Raises:
            CapacityError: ``keys`` plus the pinned adapters exceed the capacity (the batcher splits
                batches so this does not happen for requests).
        """
        keys = list(keys)
        wanted = list(dict.fromkeys(keys))
        if not self.room_for(wanted):
            raise CapacityError(
                f"{len(set(wanted) | self._pinned)} adapters needed at once, the cache holds {self.capacity}",
                hint="raise cache_capacity, or pin fewer adapters",
            )
        for key in wanted:
            if key in self._entries:
                self.stats.hits += 1
                self._entries.move_to_end(key)
                continue
            self.stats.misses += 1
            while len(self._entries) >= self.capacity:
                self._evict_one(protect=set(wanted))
            self._entries[key] = self._load(key)
            logger.info("loaded adapter %s", key)
        return [self._entries[k] for k in keys]

    def pin(self, key: str) -> str:
        """Load (if needed) and pin ``key``; returns its PEFT name."""
        if key not in self._pinned and len(self._pinned) + 1 > self.capacity:
            raise CapacityError(f"cannot pin {key}: {len(self._pinned)} of {self.capacity} slots are pinned already")
        self._pinned.add(key)
        try:
            return self.ensure([key])[0]
        except BaseException:
            self._pinned.discard(key)
            raise

    def unpin(self, key: str) -> None:
        self._pinned.discard(key)

    def evict(self, key: str) -> bool:
        """Unload ``key`` now (pinned or not); False when it was not loaded."""
        self._pinned.discard(key)
        name = self._entries.pop(key, None)
        if name is None:
            return False
        self._unload(name)
        self.stats.evictions += 1
        if self._on_evict:
            self._on_evict(key)
        return True

    def _evict_one(self, protect: set[str]) -> None:
        for key in self._entries:
            if key not in self._pinned and key not in protect:
                logger.info("evicting adapter %s (least recently used)", key)
                self.evict(key)
                return
        raise CapacityError("every loaded adapter is pinned or in use")  # excluded by room_for()


# ---------------------------------------------------------------------------------- catalog


#: why ``model: "sum"`` has nothing to serve (said in the 404's message)
SUM_MISSING = ("'sum' composes the active sum-composed versions (methods olora, inc-lora, ...) and this registry has "
               "none on the served base model: train one or name an adapter")


class ModelNotFound(CladaptError):
    """A request names a model this server does not have (answered with vLLM's 404 body)."""

    http_status = 404

    def __init__(self, name: str, *, hint: str | None = None, why: str | None = None) -> None:
        super().__init__(f"The model `{name}` does not exist.", hint=hint)
        self.name = name
        self.why = why  # said after vLLM's sentence when the name is known but has nothing to serve


@dataclass(frozen=True)
class Target:
    """What a request is answered with: a cache key (None: the base model) and a display label."""

    key: str | None
    label: str
    refs: tuple[str, ...] = field(default=())


class Catalog:
    """Names -> targets, and the loader the :class:`AdapterCache` calls.

    Args:
        store: the registry.
        base: the loaded base model's info (only versions trained on it are served).
        engine: where adapters are loaded.
        served_name: the base model's name in ``/v1/models`` (other accepted aliases: ``aliases``).
        ttl: seconds a task name's resolution is reused.
        scratch: a folder for composed sums (inside the registry's ``.work``), removed at close.
    """

    def __init__(self, store: Store, base: BaseModelInfo, engine: Engine, *, served_name: str,
                 aliases: Sequence[str] = (), ttl: float = 1.0, scratch: Path) -> None:
        self.store = store
        self.base = base
        self.engine = engine
        self.served_name = served_name
        self.base_names = {served_name, base.id, *aliases}
        self.ttl = ttl
        self.scratch = scratch
        self._resolved: dict[str, tuple[float, Target, tuple[int, int, int] | None]] = {}
        self._sums: dict[str, tuple[str, ...]] = {}
        self._loras: dict[str, Path] = {}

    # ------------------------------------------------------------------ names

    def resolve(self, name: str) -> Target:
        """The target of a request's ``model`` (not ``auto``: the router decides that).

        Raises:
            ModelNotFound: no such name, task or version (or not trained on this base).
        """
        if name in self.base_names:
            return Target(None, "base")
        if name in self._loras:
            return Target(f"lora:{name}", name)
        hit = self._resolved.get(name)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        stamp = self._status_stamp(name)
        if hit is not None and stamp is not None and hit[2] == stamp:
            # the task's status.json is the file every commit, promote and rollback replaces: while it
            # is the same file, the resolution stands. One stat instead of a registry read keeps the
            # event loop from stalling behind the decoding thread, which spread a wave of requests for
            # distinct adapters over several batches.
            self._resolved[name] = (now + self.ttl, hit[1], stamp)
            return hit[1]
        target = self._sum_of_active() if name == "sum" else self._version(name)
        self._resolved[name] = (now + self.ttl, target, stamp)
        return target

    def _status_stamp(self, name: str) -> tuple[int, int, int] | None:
        """(inode, mtime, size) of the named task's ``status.json``; None for ``sum`` or when unreadable."""
        if name == "sum":
            return None
        from cladapt.registry.refs import AdapterRef

        try:
            st = (self.store.tasks_dir / AdapterRef.parse(name).task / "status.json").stat()
        except (OSError, CladaptError):
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def invalidate(self) -> None:
        """Forget cached resolutions (after a reload)."""
        self._resolved.clear()

    def _version(self, name: str) -> Target:
        from cladapt.registry.refs import AdapterRef

        try:
            ref = AdapterRef.parse(name)
            rec = self.store.get(ref, base_fingerprint=self.base.fingerprint)
        except IncompatibleBaseModel as exc:
            raise ModelNotFound(name, hint=f"{exc} (this server runs {self.base.id})") from exc
        except (NotFound, RegistryError) as exc:
            raise ModelNotFound(name, hint=exc.hint or "GET /v1/models lists what is served") from exc
        label = f"{rec.task}@{rec.version}"
        return Target(label, label, (label,))

    def _sum_of_active(self) -> Target:
        from cladapt.adapters.loading import summed_versions

        recs = summed_versions(self.store, self.base)
        if not recs:
            raise ModelNotFound("sum", hint="no active sum-composed versions on this base model",
                                why=SUM_MISSING)
        return self.sum_target([f"{r.task}@{r.version}" for r in recs])

    def sum_target(self, refs: Sequence[str]) -> Target:
        """The composed sum of exactly ``refs`` (built once per distinct set, then cached)."""
        refs = tuple(sorted(refs))
        digest = hashlib.sha256("|".join(refs).encode()).hexdigest()[:12]
        key = f"sum[{digest}]"
        self._sums[key] = refs
        return Target(key, "sum", refs)

    # ------------------------------------------------------------------ runtime-loaded folders

    def add_lora(self, name: str, path: Path) -> str:
        """Register a PEFT LoRA folder under ``name`` (vLLM's load_lora_adapter); returns its cache key."""
        cfg_file = path / "adapter_config.json"
        if not cfg_file.is_file():
            raise CladaptError(f"lora_path {path} has no adapter_config.json", hint="pass a PEFT LoRA folder")
        if not (path / "adapter_model.safetensors").is_file():
            raise CladaptError(f"lora_path {path} has no adapter_model.safetensors", hint="only safetensors are loaded")
        try:
            peft_type = json.loads(cfg_file.read_text()).get("peft_type")
        except ValueError as exc:
            raise CladaptError(f"{cfg_file} is not valid JSON ({exc})") from exc
        if peft_type != "LORA":
            raise CladaptError(f"{cfg_file}: peft_type {peft_type!r} is not LORA")
        self._loras[name] = path
        return f"lora:{name}"

    def remove_lora(self, name: str) -> str:
        if name not in self._loras:
            raise ModelNotFound(name)
        del self._loras[name]
        return f"lora:{name}"

    def loras(self) -> dict[str, Path]:
        return dict(self._loras)

    # ------------------------------------------------------------------ cache callbacks

    @staticmethod
    def peft_name(key: str) -> str:
        """PEFT adapter names are ModuleDict keys: no dots, so registry refs map to ``task__vN``."""
        if key.startswith("sum["):
            return f"composed_sum_{key[4:-1]}"
        if key.startswith("lora:"):
            return f"lora_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        task, _, version = key.partition("@")
        return f"{task}__v{version}"

    def load(self, key: str) -> str:
        """Load ``key`` into the engine (registry files verified first); returns the PEFT name."""
        from cladapt.adapters.loading import write_merged
        from cladapt.base_model import check_compatible

        name = self.peft_name(key)
        if key.startswith("lora:"):
            self.engine.load_adapter(self._loras[key[5:]], name)
        elif key.startswith("sum["):
            recs = [self.store.get(ref) for ref in self._sums[key]]
            for rec in recs:
                check_compatible(rec.manifest.base_model, self.base, what=f"adapter {rec.task}@{rec.version}")
            folder = self.scratch / name
            shutil.rmtree(folder, ignore_errors=True)
            write_merged(self.store, recs, folder, self.base.id)
            self.engine.load_adapter(folder, name)
        else:
            rec = self.store.get(key)
            check_compatible(rec.manifest.base_model, self.base, what=f"adapter {key}")
            self.engine.load_adapter(self.store.adapter_dir(key), name)
        return name

    def unload(self, peft_name: str) -> None:
        self.engine.delete_adapter(peft_name)
        if peft_name.startswith("composed_sum_"):
            shutil.rmtree(self.scratch / peft_name, ignore_errors=True)

    # ------------------------------------------------------------------ listing

    def models(self, *, router: str | None, max_len: int) -> list[dict[str, Any]]:
        """``/v1/models`` entries: the base, every active version on this base, sum, auto, runtime loras."""
        from cladapt.adapters.loading import summed_versions

        created = int(time.time())

        def entry(mid: str, root: str, parent: str | None, **extra: Any) -> dict[str, Any]:
            return {"id": mid, "object": "model", "created": created, "owned_by": "cladapt", "root": root,
                    "parent": parent, "max_model_len": max_len, "permission": [], **({"cladapt": extra} if extra else {})}

        out = [entry(self.served_name, str(self.base.id), None, kind="base", fingerprint=self.base.fingerprint)]
        for rec in self.store.list():
            if rec.status != "active" or rec.base_fingerprint != self.base.fingerprint:
                continue
            ref = f"{rec.task}@{rec.version}"
            out.append(entry(rec.task, str(rec.path / "adapter"), self.served_name, kind="adapter", ref=ref,
                             method=rec.method, composition=rec.composition, r=rec.r, parents=list(rec.parents)))
        summed = summed_versions(self.store, self.base)
        if summed:
            out.append(entry("sum", "sum", self.served_name, kind="sum",
                             refs=[f"{r.task}@{r.version}" for r in summed]))
        if router:
            out.append(entry("auto", "auto", self.served_name, kind="auto", router=router))
        for name, path in self._loras.items():
            out.append(entry(name, str(path), self.served_name, kind="lora"))
        return out
