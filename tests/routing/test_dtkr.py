"""DTKR's properties (methods.md §6 "Tests") on synthetic embeddings: no model needed."""

from __future__ import annotations

import torch
from router_helpers import TableFeatures, assert_same_routes, clusters, view

from cladapt.serve.routers import QueryBatch
from cladapt.serve.routers.dtkr import DTKRConfig, DTKRRouter, key_scores, task_keys
from cladapt.serve.routers.state import fit_cached


def _router(n_tasks: int = 3, dim: int = 24, **cfg: object) -> tuple[DTKRRouter, torch.Tensor, torch.Tensor]:
    centres, pts = clusters(n_tasks, dim, 40)
    router = DTKRRouter(DTKRConfig(groups=4, keys=3, **cfg))
    router.fit([view(f"t{i}", pts[i]) for i in range(n_tasks)])
    return router, centres, pts


def _batch(vectors: torch.Tensor, space: str = "encoder") -> QueryBatch:
    feats = TableFeatures()
    texts = [f"q{i}" for i in range(vectors.shape[0])]
    for t, v in zip(texts, vectors, strict=True):
        feats.put(space, t, v)
    return QueryBatch(texts, feats)


def test_keys_have_unit_norm_and_shape() -> None:
    router, _, _ = _router()
    for keys in router.keys.values():
        assert keys.shape == (4, 3, 6)
        assert torch.allclose(keys.norm(dim=-1), torch.ones(4, 3), atol=1e-5)


def test_a_query_equal_to_a_key_routes_to_its_task() -> None:
    router, _, _ = _router(top_k=2)
    for ref, keys in router.keys.items():
        query = keys[:, 1, :].reshape(-1)  # the task's second key in every group, concatenated
        route = router.route(_batch(query[None]))[0]
        assert route.top == ref and dict(route.adapters)[ref] > 0.5


def test_weights_sum_to_one_and_every_candidate_is_scored() -> None:
    router, _, pts = _router(top_k=3, retrieve=6)
    for route in router.route(_batch(pts[:, 0, :] + 0.3 * pts[[1, 2, 0], 0, :])):
        assert abs(sum(w for _, w in route.adapters) - 1.0) < 1e-6
        assert all(w >= 0 for _, w in route.adapters)
        assert set(route.scores) == {"t0@1", "t1@1", "t2@1"}


def test_a_rows_route_does_not_depend_on_its_batch() -> None:
    router, _, pts = _router(top_k=2)
    queries = torch.cat([pts[0, :3], pts[2, :3], pts[1, :2]])
    together = router.route(_batch(queries))
    alone = [router.route(_batch(q[None]))[0] for q in queries]
    assert_same_routes(together, alone)


def test_separable_clusters_route_with_full_accuracy() -> None:
    _, pts = clusters(8, 48, 60, spread=0.1, seed=3)
    router = DTKRRouter(DTKRConfig(groups=6))
    router.fit([view(f"t{i}", pts[i, :40]) for i in range(8)])
    held_out = pts[:, 40:].reshape(-1, 48)
    gold = [f"t{i}@1" for i in range(8) for _ in range(20)]
    assert [r.top for r in router.route(_batch(held_out))] == gold


def test_negative_cosines_are_clamped_not_normalised() -> None:
    router, _, pts = _router(top_k=2)
    route = router.route(_batch(-pts[0, :1]))[0]  # anti-aligned with everything of t0
    assert abs(sum(w for _, w in route.adapters) - 1.0) < 1e-6 and all(w >= 0 for _, w in route.adapters)


def test_adding_a_task_leaves_earlier_state_byte_identical(tmp_path) -> None:
    _, pts = clusters(3, 24, 30)
    views = [view(f"t{i}", pts[i]) for i in range(3)]
    cfg = DTKRConfig(groups=4)
    assert fit_cached(DTKRRouter(cfg), views[:2], tmp_path) == ["t0@1", "t1@1"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fresh = DTKRRouter(cfg)
    assert fit_cached(fresh, views, tmp_path) == ["t2@1"]  # only the new task is fitted
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 2
    refit = DTKRRouter(cfg)
    refit.fit(views)
    for ref in refit.keys:
        assert torch.equal(refit.keys[ref], fresh.keys[ref])  # cached state == a fresh fit, bit for bit


def test_a_changed_signature_invalidates_its_cache(tmp_path) -> None:
    _, pts = clusters(2, 24, 30)
    cfg = DTKRConfig(groups=4)
    fit_cached(DTKRRouter(cfg), [view("t0", pts[0]), view("t1", pts[1])], tmp_path)
    assert fit_cached(DTKRRouter(cfg), [view("t0", pts[0]), view("t1", pts[1][:20])], tmp_path) == ["t1@1"]


def test_key_scores_are_the_group_mean_of_cosines() -> None:
    keys = task_keys(torch.randn(20, 12), 3, 2, seed=1)
    q = torch.randn(1, 12)
    qg = torch.nn.functional.normalize(q.reshape(3, 4), dim=-1)
    expected = torch.stack([(qg[g] @ keys[g].T) for g in range(3)]).mean(0)
    assert torch.allclose(key_scores(q, keys)[0], expected, atol=1e-6)


def test_lda_separates_clusters_that_cosine_confuses() -> None:
    from cladapt.serve.routers.lda import LDAConfig, LDARouter

    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(1, 32, generator=gen) * 3  # every row of both tasks leans the same way
    spread = torch.ones(32)
    spread[0] = 0.1  # the tasks differ along one quiet direction; the loud ones carry no task information
    a = shared + torch.randn(200, 32, generator=gen) * spread
    b = shared + torch.randn(200, 32, generator=gen) * spread
    a[:, 0] += 0.3
    b[:, 0] -= 0.3
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)  # as features are
    gold = ["a@1"] * 50 + ["b@1"] * 50
    hits = {}
    for router in (LDARouter(LDAConfig()), DTKRRouter(DTKRConfig(groups=1, keys=1, retrieve=1))):
        router.fit([view("a", a[:150]), view("b", b[:150])])
        routes = router.route(_batch(torch.cat([a[150:], b[150:]])))
        hits[router.name] = sum(r.top == g for r, g in zip(routes, gold, strict=True))
        assert all(abs(sum(w for _, w in r.adapters) - 1.0) < 1e-6 for r in routes)
    assert hits["lda"] >= 75 and hits["lda"] >= hits["dtkr"] + 15  # cosine to the centroid is near chance
    lda = LDARouter(LDAConfig())
    lda.fit([view("a", a), view("b", b)])
    before = {ref: lda.version_state(ref)[0] for ref in lda.stats}
    lda.fit([view("c", torch.randn(50, 32, generator=gen))])
    assert all(torch.equal(lda.version_state(ref)[0]["scatter"], t["scatter"]) for ref, t in before.items())
