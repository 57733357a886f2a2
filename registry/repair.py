"""Keeping the index honest: the freshness check every read runs, the repairs under the lock, and
the rule that a read never returns what a damaged index says. A mixin of
:class:`cladapt.registry.store.Store` (see :mod:`cladapt.registry.index` for why the index is
disposable).
"""

from __future__ import annotations

import builtins
import logging
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cladapt.errors import IntegrityError
from cladapt.registry import audit
from cladapt.registry.manifest import Problem

if TYPE_CHECKING:
    from cladapt.registry.index import Index
    from cladapt.registry.lock import StoreLock

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StoreIndexing:
    """Index freshness and repair for a :class:`~cladapt.registry.store.Store`."""

    if TYPE_CHECKING:  # provided by Store
        _lock: StoreLock
        _index: Index
        _audit_path: Path

        def _audit(self, action: str, ref: str | None, from_: Any, to: Any, reason: str, *, actor: str,
                   **extra: Any) -> None: ...

    def _sync(self, task: str | None = None) -> builtins.list[Problem]:
        """Cheap freshness check (directory scan + status generations, no journal beside the
        index); anything else is repaired under the lock (:meth:`_repair`).

        Returns the problems met while reindexing (logged; ``verify`` reports them).
        """
        try:
            if not self._index.has_sidecars() and not self._index.stale(task):
                return []
        except sqlite3.DatabaseError:  # the index was deleted or damaged
            pass
        with self._lock:
            problems = self._repair(task)
        for problem in problems:
            logger.warning("reindex: %s", problem)
        return problems

    def _repair(self, task: str | None = None) -> builtins.list[Problem]:
        """Under the lock: rebuild an unusable index whole, or reindex the stale tasks."""
        with self._lock:
            if not self._index.usable():
                return self._rebuild_all()
            try:
                stale = self._index.stale(task)  # re-check: a live committer may just have finished
                if not stale:
                    return []
                names = sorted(stale)
                logger.warning("index is stale for %d task(s) %s (interrupted change?); reindexing", len(names), names[:10])
                return self._reindex(stale)
            except sqlite3.DatabaseError as exc:
                logger.warning("the index is damaged (%s); rebuilding it from the manifests", exc)
                return self._rebuild_all()

    def _reindex(self, tasks: Iterable[str]) -> builtins.list[Problem]:
        """Rebuild the index rows of ``tasks`` from disk, auditing every repair. Holds the lock."""
        with self._lock:
            return self._index.rebuild(tasks, self._repair_event, self._pay_owed)

    def _rebuild_all(self) -> builtins.list[Problem]:
        """Rebuild the whole index from the manifests, swapping it in atomically. Holds the lock."""
        with self._lock:
            return self._index.rebuild_all(self._repair_event, self._pay_owed)

    def _repair_event(self, action: str, ref: str | None, from_: Any, to: Any, reason: str) -> None:
        self._audit(action, ref, from_, to, reason, actor="cladapt")

    def _pay_owed(self, events: builtins.list[dict[str, Any]]) -> None:
        """Append the events a status file still owes the audit log, unless already there. Holds the lock."""
        logged = audit.logged_ids(self._audit_path)
        for event in events:
            if event.get("id") not in logged:
                audit.append_prepared(self._audit_path, {**event, "recovered": True})
                logger.warning("audit: wrote the %s event of %s that an interrupted process owed", event.get("action"), event.get("ref"))

    def _query(self, read: Callable[[], T]) -> T:
        """Run an index read; a damaged index is rebuilt from the manifests (under the lock) and
        the read runs again. Never returns what a damaged index says."""
        try:
            return read()
        except sqlite3.DatabaseError as exc:
            logger.warning("the index is damaged (%s); rebuilding it from the manifests", exc)
        with self._lock:
            try:
                if self._index.usable():
                    return read()  # another process may have repaired it meanwhile
            except sqlite3.DatabaseError:
                pass
            self._rebuild_all()
            try:
                return read()
            except sqlite3.DatabaseError as exc:
                raise IntegrityError(
                    f"the index {self._index.path} is unreadable even after a rebuild ({exc})",
                    hint="check the disk; the manifests under tasks/ are the source of truth",
                ) from exc
