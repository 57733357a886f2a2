"""The accuracy matrix as the registry records it (methods.md §11.1).

Every version trained with evaluation carries one row in its manifest, ``metrics["eval"]``::

    {"rule": {...}, "mode": "generate", "composition": "sum", "base_fingerprint": "...",
     "scores":   {task: EvalResult.to_json() + {"adapters": [...]}},   # R[t][i]
     "before":   {task: EvalResult.to_json()},     # the model before this version, on its own task (R[t-1][t])
     "baseline": {task: EvalResult.to_json()},     # b[i]: the base model with every adapter off
     "ppl": {"value", "base", "files", "sha256", "samples", "max_length"} | None,
     "eval_data": {task: {"files": [...], "sha256": ...}}}

``eval_data`` is how eval-on-history finds each task's held-out data: the files given with
``cladapt train --eval-data`` are recorded with the version and re-used by every later version
(of this task and of the others) until a newer version records different files. A score is only
compared with another when their keys (file sha256, rule id, mode, generation budget) agree.

The *square view* used for AA/BWT/FWT/FM keeps, for every task, its newest non-rejected version,
ordered by commit time: row ``k`` is that version's row, so re-training a task moves it to the
end of the sequence. Rejected versions are listed but never enter the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cladapt.evaluation import metrics as M

if TYPE_CHECKING:
    from cladapt.registry.store import Store


def score_key(entry: dict[str, Any], row_rule: dict[str, Any] | None, mode: str | None) -> tuple[Any, ...]:
    """What must agree for two scores to be comparable."""
    rule = row_rule or {}
    return (entry.get("sha256"), rule.get("id"), mode, entry.get("max_new_tokens"), entry.get("n"),
            entry.get("precision", "no"))


@dataclass
class Row:
    """One recorded evaluation row: the model right after ``ref`` was trained."""

    ref: str
    task: str
    status: str
    created: str
    method: str
    composition: str
    base_fingerprint: str
    payload: dict[str, Any]
    gate: dict[str, Any] | None = None

    @property
    def rule(self) -> dict[str, Any]:
        return self.payload.get("rule") or {}

    @property
    def mode(self) -> str | None:
        return self.payload.get("mode")

    def entry(self, task: str, section: str = "scores") -> dict[str, Any] | None:
        return (self.payload.get(section) or {}).get(task)

    def score(self, task: str, section: str = "scores", field_: str = "score") -> float | None:
        e = self.entry(task, section)
        return None if e is None or e.get(field_) is None else float(e[field_])

    def key(self, task: str, section: str = "scores") -> tuple[Any, ...] | None:
        e = self.entry(task, section)
        return None if e is None else score_key(e, self.rule, self.mode)


def recorded_rows(store: Store, *, base_fingerprint: str | None = None) -> list[Row]:
    """Every version that recorded an evaluation row, oldest first."""
    rows = []
    for rec in store.list():
        payload = rec.manifest.metrics.get("eval")
        if not isinstance(payload, dict):
            continue
        if base_fingerprint is not None and rec.base_fingerprint != base_fingerprint:
            continue
        rows.append(Row(str(rec.ref), rec.task, rec.status, rec.created, rec.method, rec.composition,
                        rec.base_fingerprint, payload, rec.manifest.metrics.get("gate")))
    rows.sort(key=lambda r: (r.created, r.ref))
    return rows


def eval_files(store: Store, task: str, *, base_fingerprint: str | None = None) -> dict[str, Any] | None:
    """The held-out data last recorded for ``task`` (``{"files": [...], "sha256": ...}``), or None."""
    for row in reversed(recorded_rows(store, base_fingerprint=base_fingerprint)):
        found = (row.payload.get("eval_data") or {}).get(task)
        if found and found.get("files"):
            return dict(found)
    return None


def latest_score(rows: list[Row], task: str, key: tuple[Any, ...]) -> tuple[float, str] | None:
    """The newest non-rejected recorded score of ``task`` comparable with ``key``: (score, ref)."""
    for row in reversed(rows):
        if row.status == "rejected" or row.key(task) != key:
            continue
        value = row.score(task)
        if value is not None:
            return value, row.ref
    return None


def cached_baseline(rows: list[Row], task: str, key: tuple[Any, ...]) -> dict[str, Any] | None:
    """A recorded base-model result for ``task`` with a comparable key (the base never changes)."""
    for row in reversed(rows):
        if row.key(task, "baseline") == key:
            return row.entry(task, "baseline")
    return None


@dataclass
class SquareView:
    """The square accuracy matrix: ``tasks`` in training order, ``R[k][i]``, ``b[i]``."""

    tasks: list[str]
    refs: list[str]
    R: list[list[float | None]]
    b: list[float | None]
    constrained: list[list[float | None]] = field(default_factory=list)
    format_rate: list[list[float | None]] = field(default_factory=list)
    ppl: list[float | None] = field(default_factory=list)
    ppl_base: float | None = None

    def summary(self) -> dict[str, float | None]:
        return M.summary(self.R, self.b)

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks, "refs": self.refs, "R": self.R, "b": self.b, "constrained": self.constrained,
            "format_rate": self.format_rate, "ppl": self.ppl, "ppl_base": self.ppl_base, "metrics": self.summary(),
        }


def square(rows: list[Row]) -> SquareView:
    """The square view of ``rows`` (newest non-rejected version per task, commit order)."""
    newest: dict[str, Row] = {}
    for row in rows:
        if row.status != "rejected":
            newest.pop(row.task, None)  # re-inserting moves the task to the end of the order
            newest[row.task] = row
    order = list(newest.values())
    tasks = [r.task for r in order]

    def grid(field_: str) -> list[list[float | None]]:
        return [[row.score(t, "scores", field_) for t in tasks] for row in order]

    R = grid("score")
    # R[k-1][k] is usually recorded by row k as "before" (its data was unknown at k-1)
    for k in range(1, len(order)):
        if R[k - 1][k] is None:
            R[k - 1][k] = order[k].score(tasks[k], "before")
    b = [next((r.score(t, "baseline") for r in reversed(rows) if r.score(t, "baseline") is not None), None) for t in tasks]
    ppl = [(r.payload.get("ppl") or {}).get("value") for r in order]
    ppl_base = next(((r.payload.get("ppl") or {}).get("base") for r in reversed(order) if r.payload.get("ppl")), None)
    return SquareView(tasks, [r.ref for r in order], R, b, grid("constrained"), grid("format_rate"), ppl, ppl_base)
