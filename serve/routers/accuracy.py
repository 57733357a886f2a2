"""Routing accuracy: per request, with a confusion matrix, and with confusable tasks merged.

amazon and yelp are both 5-level review sentiment with the same labels: routing one to the other's
adapter is not an error for the answer's format, and often not for its content either. The report
therefore gives accuracy with every task apart and with such groups merged (a route counts as
correct when it lands anywhere in the gold task's group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: task groups that share one label space in the standard CL benchmark
DEFAULT_MERGE: tuple[tuple[str, ...], ...] = (("amazon", "yelp"),)


@dataclass
class RoutingAccuracy:
    """Accuracy of routed tasks against gold tasks (percentages)."""

    tasks: list[str]
    n: int
    accuracy: float
    accuracy_merged: float
    per_task: dict[str, float]
    confusion: dict[str, dict[str, int]]  # gold -> predicted -> count
    merged_groups: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "n": self.n, "accuracy": round(self.accuracy, 3),
                "accuracy_merged": round(self.accuracy_merged, 3),
                "per_task": {k: round(v, 3) for k, v in self.per_task.items()},
                "confusion": self.confusion, "merged_groups": self.merged_groups}


def routing_accuracy(gold: Sequence[str], predicted: Sequence[str | None],
                     merge: Sequence[Sequence[str]] = DEFAULT_MERGE) -> RoutingAccuracy:
    """Score predicted tasks (None = routed to nothing) against gold tasks."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold tasks for {len(predicted)} predictions")
    if not gold:
        raise ValueError("no rows to score")
    group_of: dict[str, int] = {}
    groups = [list(g) for g in merge if len(set(g) & set(gold)) > 1]
    for i, g in enumerate(groups):
        for t in g:
            group_of[t] = i
    tasks = list(dict.fromkeys(gold))
    confusion: dict[str, dict[str, int]] = {t: {} for t in tasks}
    hits = merged_hits = 0
    for g, p in zip(gold, predicted, strict=True):
        key = p if p is not None else "(none)"
        confusion[g][key] = confusion[g].get(key, 0) + 1
        hits += p == g
        merged_hits += p == g or (p is not None and g in group_of and group_of.get(p) == group_of[g])
    per_task = {t: 100.0 * confusion[t].get(t, 0) / sum(confusion[t].values()) for t in tasks}
    return RoutingAccuracy(tasks, len(gold), 100.0 * hits / len(gold), 100.0 * merged_hits / len(gold), per_task,
                           confusion, groups)
