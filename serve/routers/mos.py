"""MOS: self-refined adapter retrieval (Model Surgery, Sun et al., AAAI 2025; methods.md §7).

Fit (per version, from its signature): the "classes" of a task are its label values when it is a
classification task (few distinct answers), else ``C`` seeded k-means clusters of its prompts in
the base space. Per class: ``P0`` = mean base-space embedding, ``Pown`` = mean own-adapter
embedding (both L2-normalised). Route, per request::

    s0[c] = cos(e_base(x), P0[c]) over every class of every task;    t = task_of(argmax s0)
    repeat at most `max_passes` (4) times:
        s[c] = cos(e_t(x), Pown[c]) over every class;  t' = task_of(argmax s)
        stop when t' == t (a fixed point), else t = t'
    final = softmax(s / tau) + softmax(s0 * n_tasks)      (MOS's ensemble; tau = 0.1)

Deviations [cladapt]: MOS's learned prototype head is replaced by per-class prototypes; the initial
space is the base model (MOS uses the first adapter; ``initial_space=first`` restores that);
when the passes oscillate, the pass whose best class scored highest is kept (the released code
keeps the last iterate). Embeddings ``e_t(x)`` are computed once per (row, adapter) and cached.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from cladapt.serve.routers.base import QueryBatch, Route, Router, RouterConfig, TaskView
from cladapt.serve.routers.clustering import spherical_kmeans
from cladapt.serve.routers.dtkr import mix


class MOSConfig(RouterConfig):
    name: str = "mos"
    max_passes: int = Field(4, ge=0, le=16, description="self-refinement passes at most (MOS: MAX_ITER = 4)")
    tau: float = Field(0.1, gt=0, description="temperature of the refined scores in the ensemble")
    ensemble: bool = Field(True, description="add the initial guess's softmax(s0 * n_tasks), as MOS does")
    clusters: int = Field(4, ge=1, le=64, description="C: classes of a generative task (k-means of its prompts)")
    max_labels: int = Field(50, ge=2, description="more distinct answers than this (or than rows/2) = generative")
    initial_space: Literal["base", "first"] = Field("base", description="space of the initial guess: base, or the first adapter (MOS)")


class MOSRouter(Router):
    name = "mos"
    summary = "self-refined retrieval: base-space guess, then own-adapter prototypes until a fixed point (MOS)"
    Config = MOSConfig
    spaces = frozenset({"base", "adapter"})

    def __init__(self, config: RouterConfig | None = None) -> None:
        super().__init__(config)
        self.cfg: MOSConfig = self.config  # type: ignore[assignment]
        self.protos: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}  # ref -> (P0, Pown, class names)

    def _fit_one(self, view: TaskView) -> None:
        sig = view.require_signature(self.name)
        if sig.own is None:
            from cladapt.errors import CladaptError

            raise CladaptError(f"{view.ref}'s signature has no own-adapter embeddings, which MOS needs",
                               hint=f"re-index it: `cladapt route index --task {view.task} --data ...`")
        self.protos[view.ref] = prototypes(sig.base, sig.own, sig.labels, self.cfg)

    def _drop_one(self, ref: str) -> None:
        self.protos.pop(ref, None)

    def version_state(self, ref: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        p0, pown, names = self.protos[ref]
        return {"P0": p0.contiguous(), "Pown": pown.contiguous()}, {"classes": names}

    def load_version_state(self, view: TaskView, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tasks[view.ref] = view
        self.protos[view.ref] = (tensors["P0"], tensors["Pown"], list(meta["classes"]))

    def route(self, queries: QueryBatch) -> list[Route]:
        self._require_candidates()
        refs = self.candidates
        owner = torch.tensor([i for i, r in enumerate(refs) for _ in self.protos[r][2]])
        p0 = torch.cat([self.protos[r][0] for r in refs])
        pown = torch.cat([self.protos[r][1] for r in refs])
        if len(refs) == 1:  # nothing to choose: no extra passes
            return [Route(adapters=((refs[0], 1.0),), scores={refs[0]: 1.0}, info={"passes": 0}) for _ in range(len(queries))]
        if self.cfg.initial_space == "first":
            e0 = queries.embed("adapter", adapter=refs[0])
        else:
            e0 = queries.embed("base")
        s0 = e0 @ p0.T  # [B, C]
        state = _refine(queries, refs, owner, pown, s0, self.cfg)
        return [self._finish(b, refs, owner, s0[b], state) for b in range(len(queries))]

    def _finish(self, b: int, refs: list[str], owner: torch.Tensor, s0: torch.Tensor,
                state: dict[str, Any]) -> Route:
        s = state["best_s"][b]
        final = torch.softmax(s / self.cfg.tau, dim=0)
        if self.cfg.ensemble:
            final = final + torch.softmax(s0 * len(refs), dim=0)
        per_task = torch.full((len(refs),), float("-inf")).scatter_reduce(0, owner, final, reduce="amax")
        scores = {ref: float(per_task[i]) for i, ref in enumerate(refs)}
        weights = {ref: max(v, 0.0) for ref, v in scores.items()}
        info = {"passes": state["passes"][b], "path": [refs[t] for t in state["path"][b]],
                "initial": refs[state["path"][b][0]], "converged": state["converged"][b]}
        return Route(adapters=mix(weights, self.config.top_k), scores=scores, info=info)


def _refine(queries: QueryBatch, refs: list[str], owner: torch.Tensor, pown: torch.Tensor, s0: torch.Tensor,
            cfg: MOSConfig) -> dict[str, Any]:
    """Run the self-refinement for every row; rows currently on the same adapter share one pass."""
    n = s0.shape[0]
    current = owner[s0.argmax(dim=1)].tolist()
    path = [[t] for t in current]
    passes, converged = [0] * n, [False] * n
    best_s = [torch.full((pown.shape[0],), float("-inf")) for _ in range(n)]
    best_val = [float("-inf")] * n
    active = list(range(n))
    for _ in range(cfg.max_passes):
        if not active:
            break
        by_task: dict[int, list[int]] = {}
        for b in active:
            by_task.setdefault(current[b], []).append(b)
        still: list[int] = []
        for t, rows in by_task.items():
            s = queries.embed("adapter", adapter=refs[t], rows=rows) @ pown.T  # [len(rows), C]
            for b, row in zip(rows, s, strict=True):
                passes[b] += 1
                if float(row.max()) > best_val[b]:
                    best_val[b], best_s[b] = float(row.max()), row
                new_t = int(owner[int(row.argmax())])
                if new_t == t:
                    converged[b] = True
                    best_s[b] = row  # a fixed point wins over earlier passes
                else:
                    current[b] = new_t
                    path[b].append(new_t)
                    still.append(b)
        active = still
    for b in range(n):
        if passes[b] == 0:  # max_passes = 0: the initial guess alone
            best_s[b] = s0[b]
    return {"best_s": best_s, "passes": passes, "path": path, "converged": converged}


def prototypes(base: torch.Tensor, own: torch.Tensor, labels: list[str],
               cfg: MOSConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Per-class mean embeddings ``(P0 [C, d], Pown [C, d], class names)``, L2-normalised."""
    distinct = sorted(set(labels))
    if len(distinct) <= min(cfg.max_labels, max(1, len(labels) // 2)):
        assign = torch.tensor([distinct.index(x) for x in labels])
        names = distinct
    else:  # a generative task: its "classes" are clusters of its prompts
        k = min(cfg.clusters, base.shape[0])
        assign = spherical_kmeans(base, k, seed=cfg.seed)[1]
        names = [f"cluster-{j}" for j in range(k)]
    keep = [j for j in range(len(names)) if bool((assign == j).any())]
    norm = torch.nn.functional.normalize
    p0 = torch.stack([norm(base[assign == j].float().mean(0), dim=0) for j in keep])
    pown = torch.stack([norm(own[assign == j].float().mean(0), dim=0) for j in keep])
    return p0, pown, [names[j] for j in keep]
