"""MOS's retrieval properties (methods.md §7 "Tests") on synthetic embeddings."""

from __future__ import annotations

import torch
from router_helpers import TableFeatures, assert_same_routes, clusters, view

from cladapt.serve.routers import QueryBatch
from cladapt.serve.routers.mos import MOSConfig, MOSRouter, prototypes

LABELS = ["pos", "neg"]


def _fitted(n_tasks: int = 3, dim: int = 16, **cfg: object) -> tuple[MOSRouter, torch.Tensor]:
    _, pts = clusters(n_tasks * 2, dim, 30, spread=0.1)  # two classes per task
    router = MOSRouter(MOSConfig(**cfg))
    for t in range(n_tasks):
        rows = torch.cat([pts[2 * t], pts[2 * t + 1]])
        router.fit([view(f"t{t}", rows, labels=[LABELS[0]] * 30 + [LABELS[1]] * 30)])
    return router, pts


def _batch(router: MOSRouter, vecs: torch.Tensor, *, adapter_map=None) -> tuple[QueryBatch, TableFeatures]:
    """Queries whose base and per-adapter embeddings are ``vecs`` (or ``adapter_map(ref, i)``)."""
    feats = TableFeatures()
    texts = [f"q{i}" for i in range(vecs.shape[0])]
    for i, t in enumerate(texts):
        feats.put("base", t, vecs[i])
        for ref in router.candidates:
            feats.put("adapter", t, adapter_map(ref, i) if adapter_map else vecs[i], adapter=ref)
    return QueryBatch(texts, feats), feats


def test_prototypes_are_unit_per_label_means() -> None:
    base = torch.randn(6, 4)
    p0, pown, names = prototypes(base, base * 2, ["a", "b", "a", "b", "a", "b"], MOSConfig())
    assert names == ["a", "b"]
    assert torch.allclose(p0[0], torch.nn.functional.normalize(base[[0, 2, 4]].mean(0), dim=0))
    assert torch.allclose(pown.norm(dim=1), torch.ones(2))


def test_generative_tasks_get_cluster_classes() -> None:
    base = torch.randn(40, 8)
    _, _, names = prototypes(base, base, [f"answer {i}" for i in range(40)], MOSConfig(clusters=4))
    assert names and all(n.startswith("cluster-") for n in names) and len(names) <= 4


def test_separable_tasks_route_with_full_accuracy_and_stop_at_a_fixed_point() -> None:
    router, pts = _fitted()
    queries = torch.cat([pts[k, :5] + 0.02 for k in range(6)])
    batch, _ = _batch(router, queries)
    routes = router.route(batch)
    assert [r.top for r in routes] == [f"t{k // 2}@1" for k in range(6) for _ in range(5)]
    for r in routes:
        assert r.info["converged"] and r.info["passes"] == 1
        assert abs(sum(w for _, w in r.adapters) - 1.0) < 1e-6


def test_refinement_moves_to_the_task_the_adapter_space_points_at() -> None:
    router, pts = _fitted()
    # the base space says t0, but t0's adapter embeds the query next to t2's prototypes, and t2's agrees
    batch, _ = _batch(router, pts[0, :1], adapter_map=lambda ref, i: pts[4, 0] if ref in ("t0@1", "t2@1") else pts[2, 0])
    route = router.route(batch)[0]
    assert route.info["initial"] == "t0@1" and route.info["path"] == ["t0@1", "t2@1"]
    assert route.info["converged"] and route.info["passes"] == 2


def test_oscillation_stops_after_max_passes() -> None:
    router, pts = _fitted(max_passes=4)
    # t0's adapter points at t1, t1's at t0: never a fixed point
    batch, feats = _batch(router, pts[0, :1], adapter_map=lambda ref, i: pts[2, 0] if ref == "t0@1" else pts[0, 0])
    route = router.route(batch)[0]
    assert route.info["passes"] == 4 and not route.info["converged"]
    assert len([c for c in feats.calls if c[0] == "adapter"]) == 2  # (row, adapter) embeddings are cached
    assert route.top in ("t0@1", "t1@1")


def test_one_task_routes_without_any_pass() -> None:
    router, pts = _fitted(n_tasks=1)
    batch, feats = _batch(router, pts[0, :3])
    assert {r.top for r in router.route(batch)} == {"t0@1"} and feats.calls == []


def test_a_rows_route_does_not_depend_on_its_batch() -> None:
    router, pts = _fitted()
    queries = torch.cat([pts[0, :2], pts[3, :2], pts[5, :2]])
    together = router.route(_batch(router, queries)[0])
    alone = [router.route(_batch(router, q[None])[0])[0] for q in queries]
    assert_same_routes(together, alone)
