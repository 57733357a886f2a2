"""Run extensions selected by the config: data transforms (ASD) and loss plugins (GeRe replay).

``build_extensions(cfg, store)`` returns the callables ``train_task`` applies, in order, to the
run context before encoding. Each extension owns one concept; ``train_task`` never checks which.
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
    return extensions
