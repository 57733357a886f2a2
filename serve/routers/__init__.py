"""Routers: choose the adapter(s) per request without a task id. ``ROUTERS`` is THE table.

Adding a router: ``serve/routers/<name>.py`` with a :class:`Router` subclass (and its
``RouterConfig``), one line here; third parties register under the entry-point group
``cladapt.routers``. The protocol, :class:`Route` and :class:`QueryBatch` are in :mod:`.base`.
"""

from __future__ import annotations

from cladapt.plugins import Registry
from cladapt.serve.routers.base import SPACES, FeatureSource, QueryBatch, Route, Router, RouterConfig, TaskView

ROUTERS: Registry[Router] = Registry(
    "router",
    base=Router,
    entry_point_group="cladapt.routers",
    builtins={
        "oracle": "cladapt.serve.routers.oracle:OracleRouter",
        "dtkr": "cladapt.serve.routers.dtkr:DTKRRouter",
        "mos": "cladapt.serve.routers.mos:MOSRouter",
        "arrow": "cladapt.serve.routers.arrow:ArrowRouter",
        "sum": "cladapt.serve.routers.sum:SumRouter",
        "lda": "cladapt.serve.routers.lda:LDARouter",
    },
)

__all__ = ["ROUTERS", "SPACES", "FeatureSource", "QueryBatch", "Route", "Router", "RouterConfig", "TaskView"]
