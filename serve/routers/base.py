"""The router protocol: pick the adapter(s) for each request without a task id.

A router is fitted from per-version :class:`TaskView` objects (registry record + the
router-agnostic signature written at training time + lazy access to the adapter weights) and then
maps a :class:`QueryBatch` to one :class:`Route` per row. The contract, which every router in
``ROUTERS`` follows and the tests check:

* **per request**: a row's route never depends on the other rows of its batch (SLM's released
  code averages similarities over the batch, which leaks task identity; cladapt does not);
* **explainable**: a route carries every candidate's score, so ``cladapt route`` can show why;
* **normalised**: the weights of a ``mix`` route are >= 0 and sum to 1 (top-1 is one entry of 1.0);
* **incremental**: ``fit`` is called again with only the new versions and must leave the state of
  earlier ones unchanged (their state is cached per version outside the immutable versions);
* **feature-agnostic**: routers never run the model themselves for the query side; they ask the
  batch for embeddings in a named space (:data:`SPACES`), which the caller computes once and caches,
  so a server embedding a prompt for one router does not embed it again for the next.

How the caller applies a route (``Route.combine``):

``mix``   the weighted combination of the listed task adapters for that row only (top-1: one
          adapter; JARe: several, weights summing to 1; see :mod:`cladapt.serve.routers.jare`);
``sum``   every listed adapter at full strength (the sum-composed sequence, weights are 1.0);
``arrow`` PEFT's Arrow layer routes per token inside the model; the listed adapters are the experts
          and the scores are the prompt's mean routing probabilities (diagnostic);
``base``  no adapter (no candidate at all).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cladapt.errors import CladaptError

if TYPE_CHECKING:
    import torch

    from cladapt.features import Signature

#: the embedding spaces a router may ask for (see :mod:`cladapt.features`):
#: ``base`` = mean-pooled last hidden state of the base model with adapters off;
#: ``adapter`` = the same with one candidate's adapter on (needs ``adapter=ref``);
#: ``encoder`` = the optional sentence encoder (all-MiniLM-L6-v2).
SPACES: tuple[str, ...] = ("base", "adapter", "encoder")

Combine = Literal["mix", "sum", "arrow", "base"]


class RouterConfig(BaseModel):
    """Base of every router's typed config (``extra="forbid"`` turns typos into errors)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="router name in the ROUTERS table")
    top_k: int = Field(1, ge=1, le=64, description="adapters combined per request; > 1 is JARe weighted mixing")
    seed: int = Field(0, description="seed of every random choice the router makes while fitting")


@dataclass(frozen=True)
class Route:
    """One request's routing decision.

    Attributes:
        adapters: ``(ref, weight)`` pairs, best first; refs are explicit (``amazon@3``).
        scores: every candidate's score (ref -> score, higher is better), so a user can see why.
        combine: how the caller applies ``adapters`` (module docstring).
        info: router-specific diagnostics (e.g. MOS's refinement passes), JSON-serialisable.
    """

    adapters: tuple[tuple[str, float], ...]
    scores: Mapping[str, float] = field(default_factory=dict)
    combine: Combine = "mix"
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # internal invariants of every router's output: a broken router must fail loudly here
        if self.combine == "base":
            if self.adapters:
                raise ValueError("a 'base' route lists no adapters")
            return
        if not self.adapters:
            raise ValueError(f"a {self.combine!r} route needs at least one adapter")
        weights = [w for _, w in self.adapters]
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"route weights must be finite and >= 0, got {weights}")
        if self.combine == "mix" and abs(sum(weights) - 1.0) > 1e-4:
            raise ValueError(f"the weights of a 'mix' route must sum to 1, got {sum(weights)}")

    @property
    def top(self) -> str | None:
        """The highest-weighted adapter's ref (None for a base route)."""
        return self.adapters[0][0] if self.adapters else None

    @property
    def refs(self) -> list[str]:
        return [ref for ref, _ in self.adapters]

    @property
    def task(self) -> str | None:
        """The task of the top adapter (``amazon@3`` -> ``amazon``)."""
        top = self.top
        return top.partition("@")[0] if top is not None else None

    def to_json(self) -> dict[str, Any]:
        return {
            "adapters": [{"ref": ref, "weight": round(w, 6)} for ref, w in self.adapters],
            "combine": self.combine,
            "scores": {ref: round(float(s), 6) for ref, s in sorted(self.scores.items(), key=lambda kv: -kv[1])},
            "info": dict(self.info),
        }


@dataclass(frozen=True)
class TaskView:
    """What a router may know about one candidate version.

    Attributes:
        ref: explicit ref, ``task@N``.
        peft_name: the PEFT adapter name the serving model uses for it (``task__vN``).
        composition: the method's composition rule (``route`` / ``sum`` / ``single``).
        lora: the version's LoRA shape (r, alpha, target_modules).
        signature: the router-agnostic signature (None when the version has none yet; see
            ``cladapt route index``).
        adapter_dir: lazily returns the verified PEFT adapter folder (Arrow reads the weights).
    """

    ref: str
    task: str
    version: int
    peft_name: str
    composition: str
    lora: Mapping[str, Any]
    signature: Signature | None = None
    adapter_dir: Callable[[], Path] | None = None

    def require_signature(self, router: str) -> Signature:
        if self.signature is None:
            raise CladaptError(
                f"router {router!r} needs a signature for {self.ref}, which has none",
                hint=f"write one with `cladapt route index --task {self.task} --data <the task's jsonl>`",
            )
        return self.signature


class FeatureSource(Protocol):
    """Computes query embeddings; implemented by :class:`cladapt.features.FeatureExtractor`."""

    def spaces(self) -> frozenset[str]:
        """The spaces this source can compute (``encoder`` only when the encoder is installed)."""
        ...

    def embed(self, space: str, texts: Sequence[str], *, adapter: str | None = None) -> torch.Tensor:
        """L2-normalised float32 embeddings ``[len(texts), d]``; ``adapter`` (a ref) for ``adapter``."""
        ...


class QueryBatch:
    """The prompts of one batch plus cached access to their embeddings.

    Embeddings are computed per row (no row sees another), on demand, once per (space, adapter,
    row): a router asking twice, or two routers asking for the same space, cost one pass.

    Args:
        prompts: the request texts (the user's input, no chat template).
        features: where embeddings come from (None: only the ``oracle`` router can run).
        task_ids: optional known task per row (the oracle router reads it).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        features: FeatureSource | None = None,
        *,
        task_ids: Sequence[str | None] | None = None,
    ) -> None:
        self.prompts = list(prompts)
        self.features = features
        if task_ids is not None and len(task_ids) != len(self.prompts):
            raise CladaptError(f"{len(task_ids)} task ids for {len(self.prompts)} prompts")
        self.task_ids = list(task_ids) if task_ids is not None else None
        self._cache: dict[tuple[str, str | None], dict[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def embed(self, space: str, *, adapter: str | None = None, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Embeddings ``[len(rows), d]`` of the given rows (all rows by default) in ``space``."""
        import torch

        if space not in SPACES:
            raise CladaptError(f"unknown feature space {space!r}", hint=f"spaces: {', '.join(SPACES)}")
        if (space == "adapter") != (adapter is not None):
            raise CladaptError("the 'adapter' space needs adapter=<ref>, and only it takes one")
        if self.features is None:
            raise CladaptError(f"no feature source: the {space!r} embeddings cannot be computed")
        wanted = list(range(len(self))) if rows is None else list(rows)
        cache = self._cache.setdefault((space, adapter), {})
        missing = [i for i in dict.fromkeys(wanted) if i not in cache]
        if missing:
            out = self.features.embed(space, [self.prompts[i] for i in missing], adapter=adapter)
            for i, vec in zip(missing, out, strict=True):
                cache[i] = vec
        if not wanted:
            return torch.empty(0, 0)
        return torch.stack([cache[i] for i in wanted])


class Router(abc.ABC):
    """Base of every router (the ``ROUTERS`` table requires it).

    Subclasses set ``name``, ``summary``, ``Config`` and ``spaces`` and implement ``fit``/``route``.
    Per-version state goes through ``version_state``/``load_version_state`` so it can be cached
    outside the registry's immutable versions and refitted incrementally
    (:mod:`cladapt.serve.routers.state`).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[RouterConfig]] = RouterConfig
    #: query-side feature spaces the router reads (``cladapt route`` computes only these)
    spaces: ClassVar[frozenset[str]] = frozenset()
    #: the router derives per-version state from signatures (and so needs them)
    needs_signatures: ClassVar[bool] = True
    #: the router runs a model of its own (Arrow): the caller hands it one with ``bind_model``
    needs_model: ClassVar[bool] = False

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config if config is not None else self.Config(name=self.name)
        self.tasks: dict[str, TaskView] = {}

    def bind_model(self, model: Any, tokenizer: Any) -> None:  # noqa: B027 - only needs_model routers use it
        """Give a ``needs_model`` router its own base model (it may wrap it in place) and tokenizer."""

    @property
    def candidates(self) -> list[str]:
        """Refs the router can choose from, in fitting order."""
        return list(self.tasks)

    def fit(self, tasks: Sequence[TaskView]) -> None:
        """Add candidates. Called again with only new versions; earlier state must stay unchanged."""
        for view in tasks:
            if view.ref in self.tasks:
                raise CladaptError(f"router {self.name!r}: {view.ref} is already fitted")
        for view in tasks:
            self.tasks[view.ref] = view
            self._fit_one(view)

    def remove(self, refs: Sequence[str]) -> None:
        """Drop candidates (a version archived or replaced by a newer active one)."""
        for ref in refs:
            self.tasks.pop(ref, None)
            self._drop_one(ref)

    @abc.abstractmethod
    def _fit_one(self, view: TaskView) -> None:
        """Derive the state of one version (from its signature or weights)."""

    def _drop_one(self, ref: str) -> None:  # noqa: B027 - stateless routers keep nothing per version
        """Forget the state of one version."""

    @abc.abstractmethod
    def route(self, queries: QueryBatch) -> list[Route]:
        """One :class:`Route` per row of ``queries``, each computed from that row alone."""

    # ---- per-version state, for the cache (tensors + JSON; never pickle)

    def version_state(self, ref: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The derived state of one fitted version, or None when the router keeps none."""
        return None

    def load_version_state(self, view: TaskView, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore state produced by :meth:`version_state` instead of fitting ``view`` again."""
        raise NotImplementedError(f"router {self.name!r} keeps no cached state")

    def _require_candidates(self) -> None:
        if not self.tasks:
            raise CladaptError(
                f"router {self.name!r} has no candidates",
                hint="train a task first, or index older versions with `cladapt route index`",
            )
