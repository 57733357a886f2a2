"""Registry maintenance: full verification (every file re-hashed, index vs manifests) and cleaning
the ``.work`` scratch. A mixin of :class:`cladapt.registry.store.Store`; both are what
``cladapt registry verify`` runs, and neither is needed on the training or serving path.
"""

from __future__ import annotations

import builtins
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cladapt.registry import audit
from cladapt.registry.manifest import Problem, check_evals, check_version

if TYPE_CHECKING:
    from cladapt.registry.index import Index
    from cladapt.registry.lock import StoreLock

logger = logging.getLogger(__name__)


class StoreMaintenance:
    """``verify`` and ``clean_work`` of a :class:`~cladapt.registry.store.Store`."""

    if TYPE_CHECKING:  # provided by Store
        work_dir: Path
        _lock: StoreLock
        _index: Index
        _audit_path: Path

        def _sync(self, task: str | None = None) -> builtins.list[Problem]: ...

        def _rebuild_all(self) -> builtins.list[Problem]: ...

    def verify(self, *, reindex: bool = False) -> builtins.list[Problem]:
        """Check everything: re-hash every file of every version, and compare the index with the
        manifests and statuses. ``reindex`` first rebuilds the index from the manifests.

        Returns the problems that remain (an empty list means the registry is sound).
        """
        problems: builtins.list[Problem] = []
        with self._lock:
            if reindex:
                problems += self._rebuild_all()
            else:
                problems += self._sync()
            problems += self._index.compare()
        for rec in self._index.records():
            problems += check_version(rec.path, rec.manifest)
            problems += check_evals(rec.path, str(rec.ref))
        bad_lines = audit.read_events(self._audit_path)[1]
        if bad_lines:
            problems.append(Problem(audit.AUDIT_FILE, f"malformed line(s) {bad_lines[:10]}"))
        problems = builtins.list(dict.fromkeys(problems))  # a reindex and the comparison may both see one
        for problem in problems:
            logger.warning("verify: %s", problem)
        return problems

    def clean_work(self, *, older_than_s: float = 24 * 3600) -> int:
        """Delete ``.work`` debris: trash, and staging folders untouched for ``older_than_s``."""
        import time

        cutoff = time.time() - older_than_s
        removed = 0
        for sub, always in ((self.work_dir / "trash", True), (self.work_dir / "staging", False)):
            for path in sub.iterdir() if sub.is_dir() else []:
                if always or path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
        return removed
