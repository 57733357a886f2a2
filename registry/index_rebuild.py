"""Rebuilding the index from the disk, and comparing the two: a mixin of :class:`~cladapt.registry.index.Index`.

The files under ``tasks/`` are the source of truth; these methods turn them back into rows
(repairing ``status.json`` on the way, see :meth:`IndexRebuilding.rebuild`) and list every
difference between rows and files without changing anything (:meth:`IndexRebuilding.compare`,
behind ``registry verify``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import IntegrityError
from cladapt.registry.disk import TASK_DIR, disk_state, load_checked_manifest, version_dirs
from cladapt.registry.fsio import is_tmp_name
from cladapt.registry.manifest import Problem, VersionRecord, make_record
from cladapt.registry.status import TaskStatus, load_task_status, save_task_status

#: Called for every repair: (action, ref, from, to, reason) -> appends an audit event.
EventSink = Callable[[str, "str | None", Any, Any, str], None]
#: Called with the audit events a task's status.json still owes the log (see TaskStatus.owed_audit).
OwedSink = Callable[[list[dict[str, Any]]], None]


class IndexRebuilding:
    """``stale``, ``rebuild`` and ``compare`` of an :class:`~cladapt.registry.index.Index`."""

    if TYPE_CHECKING:  # provided by Index
        tasks_dir: Path

        def state(self, task: str | None = None) -> dict[str, tuple[int, frozenset[int]]]: ...

        def records(self, task: str | None = None, **kwargs: Any) -> list[VersionRecord]: ...

        def replace_tasks(
            self, tasks: dict[str, tuple[int, frozenset[int], list[VersionRecord], dict[int, str]]]
        ) -> None: ...

    def stale(self, task: str | None = None) -> set[str]:
        """Tasks whose rows no longer match the disk (version dirs or status generation differ)."""
        disk, indexed = disk_state(self.tasks_dir, task), self.state(task)
        return {t for t in disk.keys() | indexed.keys() if disk.get(t) != indexed.get(t)}

    def rebuild(
        self, tasks: Iterable[str], on_event: EventSink, on_owed: OwedSink, *, previous: IndexRebuilding | None = None
    ) -> list[Problem]:
        """Rebuild the rows of ``tasks`` from their manifests, repairing ``status.json`` on the way.

        The caller must hold the registry lock. Repairs, each reported to ``on_event``:
        a version directory without a status (a commit killed after its rename) becomes
        ``candidate``, never silently ``active``; a status without a directory (a remove killed
        after its rename) is dropped; an unreadable ``status.json`` is rebuilt from the index.
        Audit events the status file still owes go to ``on_owed``. Versions whose manifest is
        unreadable, newer, misplaced or differs from its recorded sha256 get no row: they are
        recorded as skipped and returned as problems.
        ``previous`` is the index whose statuses rebuild an unreadable ``status.json`` (default: self).
        """
        problems: list[Problem] = []
        batch: dict[str, tuple[int, frozenset[int], list[VersionRecord], dict[int, str]]] = {}
        for task in sorted(set(tasks)):
            task_dir = self.tasks_dir / task
            if task_dir.is_symlink() or not task_dir.is_dir():
                batch[task] = (-1, frozenset(), [], {})
                continue
            for leftover in task_dir.iterdir():  # temporaries of a writer killed mid-write
                if is_tmp_name(leftover.name):
                    leftover.unlink(missing_ok=True)
            status, changed = self._load_or_rebuild_status(task, problems, on_event, previous or self)
            if status.owed_audit:
                on_owed(status.owed_audit)
                status.owed_audit = []
                changed = True
            dirs = version_dirs(task_dir)
            records, skipped = [], {}
            for version in sorted(dirs):
                if version not in status.versions:
                    status.versions[version] = "candidate"
                    changed = True
                    on_event("recover", f"{task}@{version}", None, "candidate", "version found without a status")
                found = load_checked_manifest(task_dir, version, problems, status.manifests.get(version))
                if found is None:
                    skipped[version] = problems[-1].message
                    continue
                manifest, digest = found
                if version not in status.manifests:  # written before manifests were hashed, or recovered
                    status.manifests[version] = digest
                    changed = True
                records.append(make_record(manifest, status.versions[version], task_dir / f"v{version}"))
            for version in sorted(set(status.versions) - dirs):
                on_event("recover", f"{task}@{version}", status.versions.pop(version), None, "status without a version")
                status.manifests.pop(version, None)
                changed = True
            status.last_version = max([status.last_version, *dirs])
            if changed:
                status.generation += 1
                save_task_status(task_dir / "status.json", status)
            batch[task] = (status.generation, dirs, records, skipped)
        self.replace_tasks(batch)
        return problems

    def _load_or_rebuild_status(
        self, task: str, problems: list[Problem], on_event: EventSink, previous: IndexRebuilding | None
    ) -> tuple[TaskStatus, bool]:
        try:
            return load_task_status(self.tasks_dir / task / "status.json"), False
        except IntegrityError as exc:
            problems.append(Problem(f"{task}/status.json", exc.message))
            try:
                known = {rec.version: rec.status for rec in previous.records(task)} if previous else {}
                generation = previous.state(task).get(task, (0, frozenset()))[0] + 1 if previous else 1
            except sqlite3.DatabaseError:
                known, generation = {}, 1
            on_event("recover", task, None, None, "status.json was unreadable; rebuilt from the index")
            return TaskStatus(generation=max(generation, 1), versions=known), True

    def compare(self) -> list[Problem]:
        """Differences between the index and the manifests + statuses on disk (nothing is changed)."""
        problems: list[Problem] = []
        indexed = {(rec.task, rec.version): rec for rec in self.records()}
        seen: set[tuple[str, int]] = set()
        for entry in sorted(os.scandir(self.tasks_dir), key=lambda e: e.name):
            if entry.is_symlink():
                problems.append(Problem(f"tasks/{entry.name}", "is a symbolic link (refused; not a task)"))
                continue
            if not TASK_DIR.fullmatch(entry.name) or not entry.is_dir():
                problems.append(Problem(f"tasks/{entry.name}", "not a valid task folder"))
                continue
            try:
                status = load_task_status(Path(entry.path) / "status.json")
            except IntegrityError as exc:
                problems.append(Problem(f"{entry.name}/status.json", exc.message))
                continue
            if sum(s == "active" for s in status.versions.values()) > 1:
                problems.append(Problem(entry.name, "more than one active version"))
            for version in sorted(version_dirs(Path(entry.path))):
                seen.add((entry.name, version))
                found = load_checked_manifest(Path(entry.path), version, problems, status.manifests.get(version))
                if found is None:
                    continue
                expected = make_record(found[0], status.versions.get(version, "?"), Path(entry.path) / f"v{version}")
                rec = indexed.get((entry.name, version))
                if rec is None:
                    problems.append(Problem(str(expected.ref), "missing from the index (run verify --reindex)"))
                elif rec != expected or rec.manifest != found[0]:
                    problems.append(Problem(str(expected.ref), "index row differs from the manifest (run verify --reindex)"))
        problems += [Problem(f"{t}@{v}", "indexed but its folder is missing") for (t, v) in sorted(indexed.keys() - seen)]
        return problems
