"""Run extensions selected by the config: data transforms (ASD) and loss plugins (GeRe replay).

``build_extensions(cfg, store)`` returns the callables ``train_task`` applies, in order, to the
run context before encoding. Each extension owns one concept; ``train_task`` never checks which.

Order: ASD first (it rewrites the task's own rows), then replay (it adds general rows, the
``gere`` loss plugin and, in BI mode, the sampler). The two are independent and combine freely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cladapt.config import RunConfig
    from cladapt.registry.store import Store
    from cladapt.train.run import RunExtension


def build_extensions(cfg: RunConfig, store: Store) -> list[RunExtension]:
    """The extensions ``cfg`` enables, in application order."""
    extensions: list[RunExtension] = []
    if cfg.asd.enabled and cfg.asd.percent > 0:
        from cladapt.train.asd import asd_extension

        extensions.append(asd_extension(cfg.asd))
    if cfg.replay.enabled:
        from cladapt.train.replay import replay_extension

        extensions.append(replay_extension(cfg.replay, store))
    return extensions
