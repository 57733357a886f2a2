"""The sum router: every candidate at full strength, for the sum-composed sequence (O-LoRA, InfLoRA, ...).

Sum-composed methods train each task in a subspace that leaves the others alone, so at inference
they are meant to be applied together; this router says so explicitly in the same protocol, so a
server or ``bench cl`` can treat "route" and "sum" registries alike. Use it with candidates of
composition ``sum`` (``--compositions sum``).
"""

from __future__ import annotations

from cladapt.serve.routers.base import QueryBatch, Route, Router, RouterConfig, TaskView


class SumRouter(Router):
    name = "sum"
    summary = "every active sum-composed version at once (the composition O-LoRA and friends train for)"
    Config = RouterConfig
    needs_signatures = False

    def _fit_one(self, view: TaskView) -> None:
        """Nothing to derive: every candidate is always used."""

    def route(self, queries: QueryBatch) -> list[Route]:
        self._require_candidates()
        refs = self.candidates
        return [Route(adapters=tuple((ref, 1.0) for ref in refs), scores=dict.fromkeys(refs, 1.0), combine="sum")
                for _ in range(len(queries))]
