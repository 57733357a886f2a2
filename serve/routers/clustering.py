"""Seeded spherical k-means: the deterministic replacement of SLM's gradient-trained keys.

Both maximise the cosine similarity of a task's inputs to their nearest key (methods.md §6); k-means
needs no training loop, and with a fixed seed and a fixed sample it gives byte-identical keys on
every run, which is what lets a router cache per-task state and refit incrementally.
"""

from __future__ import annotations

import torch


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def spherical_kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` by cosine similarity.

    Args:
        x: ``[n, d]`` vectors (normalised here).
        k: clusters; with fewer distinct rows than ``k`` the extra centres repeat existing ones.

    Returns:
        (centres ``[k, d]`` with unit norm, assignment ``[n]``).
    """
    x = _normalize(x)
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one row")
    gen = torch.Generator().manual_seed(seed)
    # k-means++ seeding on cosine distance, from a seeded generator
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    for _ in range(1, k):
        sims = x @ torch.stack(centres).T
        dist = (1.0 - sims.max(dim=1).values).clamp_min(0.0)
        if float(dist.sum()) <= 1e-12:  # every row already sits on a centre
            centres.append(centres[len(centres) % len(centres)])
            continue
        centres.append(x[int(torch.multinomial(dist / dist.sum(), 1, generator=gen))])
    c = torch.stack(centres)
    assign = torch.zeros(n, dtype=torch.long)
    for step in range(iters):
        new_assign = (x @ c.T).argmax(dim=1)
        if step > 0 and torch.equal(new_assign, assign):
            break
        assign = new_assign
        for j in range(k):
            members = x[assign == j]
            if members.shape[0]:  # an empty cluster keeps its centre
                c[j] = _normalize(members.sum(0, keepdim=True))[0]
    return _normalize(c), assign
