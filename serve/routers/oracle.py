"""The oracle router: the task is given with the request (the classic CL evaluation setting).

It is the reference every content router is measured against (``bench cl``'s ``lora`` cell), and
what a client that knows its task should use: no embedding pass at all.
"""

from __future__ import annotations

from cladapt.errors import CladaptError
from cladapt.serve.routers.base import QueryBatch, Route, Router, RouterConfig, TaskView


class OracleRouter(Router):
    name = "oracle"
    summary = "the task is given with each request (no embedding); the reference for the others"
    Config = RouterConfig
    needs_signatures = False

    def _fit_one(self, view: TaskView) -> None:
        """Nothing to derive: the task name is the key."""

    def route(self, queries: QueryBatch) -> list[Route]:
        self._require_candidates()
        by_task = {view.task: ref for ref, view in self.tasks.items()}
        if queries.task_ids is None:
            raise CladaptError("the oracle router needs the task of every request", hint="pass --task (or use dtkr/mos)")
        routes = []
        for row, task in enumerate(queries.task_ids):
            if task is None or task not in by_task:
                raise CladaptError(f"row {row}: task {task!r} has no active routable version",
                                   hint=f"candidates: {', '.join(sorted(by_task))}")
            ref = by_task[task]
            routes.append(Route(adapters=((ref, 1.0),), scores={r: float(r == ref) for r in self.tasks}))
        return routes
