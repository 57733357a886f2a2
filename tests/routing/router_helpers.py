"""Synthetic candidates and a feature source for router unit tests (no model needed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cladapt.features import Signature
from cladapt.serve.routers.base import TaskView


class TableFeatures:
    """A FeatureSource that looks texts up in tables: space -> text -> vector (adapter space per ref)."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str | None], dict[str, torch.Tensor]] = {}
        self.calls: list[tuple[str, str | None, int]] = []

    def put(self, space: str, text: str, vec: torch.Tensor, adapter: str | None = None) -> None:
        self.tables.setdefault((space, adapter), {})[text] = torch.nn.functional.normalize(vec.float(), dim=0)

    def spaces(self) -> frozenset[str]:
        return frozenset(space for space, _ in self.tables)

    def embed(self, space: str, texts: Sequence[str], *, adapter: str | None = None) -> torch.Tensor:
        self.calls.append((space, adapter, len(texts)))
        return torch.stack([self.tables[(space, adapter)][t] for t in texts])


def clusters(n_tasks: int, dim: int, rows: int, *, spread: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated clusters: centres [T, dim] and rows [T, rows, dim] (unit norm)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_tasks, dim, generator=gen), dim=-1)
    pts = centres[:, None, :] + spread * torch.randn(n_tasks, rows, dim, generator=gen)
    return centres, torch.nn.functional.normalize(pts, dim=-1)


def view(task: str, base: torch.Tensor, *, own: torch.Tensor | None = None, encoder: torch.Tensor | None = None,
         labels: list[str] | None = None, version: int = 1) -> TaskView:
    sig = Signature(base=base, own=own if own is not None else base, encoder=encoder if encoder is not None else base,
                    labels=labels or ["x"] * base.shape[0])
    return TaskView(ref=f"{task}@{version}", task=task, version=version, peft_name=f"{task}__v{version}",
                    composition="route", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, signature=sig)


def assert_same_routes(a: Sequence[object], b: Sequence[object], tol: float = 1e-5) -> None:
    """Same adapters in the same order, weights and scores equal up to float rounding of batched matmuls."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert [r for r, _ in x.adapters] == [r for r, _ in y.adapters]
        assert all(abs(u - v) < tol for (_, u), (_, v) in zip(x.adapters, y.adapters, strict=True))
        assert x.scores.keys() == y.scores.keys()
        assert all(abs(x.scores[k] - y.scores[k]) < tol for k in x.scores)
