"""The write side of the store: stage, commit, status changes and removal (see :mod:`cladapt.registry.store`
for the commit recipe and its crash points). A mixin of :class:`~cladapt.registry.store.Store`.

Every change takes the store lock, re-checks the task against the disk, then follows one order:
``status.json`` (owing its audit events) -> index -> audit log -> clear the debt, so a process
killed at any step leaves a registry the next open repairs.
"""

from __future__ import annotations

import builtins
import logging
import os
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import Conflict, RegistryError
from cladapt.registry import audit
from cladapt.registry.fsio import atomic_write_bytes, crash_point, fsync_dir, sha256_bytes
from cladapt.registry.index import version_dirs
from cladapt.registry.manifest import VersionRecord, make_record
from cladapt.registry.refs import AdapterRef, coerce_ref, validate_task_name
from cladapt.registry.staging import Staging, build_manifest, collect_files, publish_version
from cladapt.registry.status import STATUSES, TaskStatus, load_task_status, save_task_status

if TYPE_CHECKING:
    from cladapt.registry.index import Index
    from cladapt.registry.lock import StoreLock

logger = logging.getLogger(__name__)


class StoreChanges:
    """``stage``, ``commit``, ``set_status`` and ``remove`` of a :class:`~cladapt.registry.store.Store`."""

    if TYPE_CHECKING:  # provided by Store
        root: Path
        work_dir: Path
        _lock: StoreLock
        _index: Index
        _audit_path: Path

        def _work_dir(self, name: str) -> Path: ...

        def _task_dir(self, task: str) -> Path: ...

        def _status_path(self, task: str) -> Path: ...

        def _version_dirs(self, task: str) -> frozenset[int]: ...

        def _refuse_links(self) -> None: ...

        def _sync(self, task: str) -> Any: ...

        def _rebuild_all(self) -> Any: ...

        def _query(self, read: Any) -> Any: ...

        def get(self, ref: AdapterRef | str, *, base_fingerprint: str | None = None) -> VersionRecord: ...

    def stage(self, task: str) -> Staging:
        """A new private staging directory for one version of ``task``; no lock is taken."""
        validate_task_name(task)
        try:
            return Staging.create(task, self._work_dir("staging") / uuid.uuid4().hex)
        except OSError as exc:
            raise read_only_error(self.work_dir / "staging", exc) from exc

    def commit(self, staging: Staging, *, status: str = "active", reason: str = "trained", actor: str = "cladapt") -> VersionRecord:
        """Turn a staging directory into the next version of its task (see the module docstring).

        ``manifest_fields["parents"]`` may use any ref form; they are resolved to explicit
        versions here and must exist. Committing as ``active`` archives the previous active one.

        Raises:
            RegistryError: invalid manifest fields or staged files (all listed), or a bad status.
            NotFound: a parent does not exist.
        """
        self._check_status(status)
        if not staging.is_open or staging.dir.parent != self.work_dir / "staging":
            raise RegistryError(f"{staging!r} is not an open staging of the registry at {self.root}", hint="use Store.stage()")
        (staging.dir / "manifest.json").unlink(missing_ok=True)  # left by a failed earlier attempt
        files = collect_files(staging.dir)  # hashing and fsync happen before the lock
        fields = dict(staging.manifest_fields)
        raw_parents = [coerce_ref(p) for p in fields.pop("parents", [])]
        fixed = {"task": staging.task, "files": files, "created": audit.utc_now()}
        build_manifest({**fields, "parents": []}, version=1, **fixed)  # fail fast, outside the lock
        with self._lock:
            self._refuse_links()
            self._sync(staging.task)
            parents = [str(self.get(p).ref) for p in raw_parents]
            task_dir = self._task_dir(staging.task)
            task_status = load_task_status(task_dir / "status.json")
            version = max([task_status.last_version, *version_dirs(task_dir)]) + 1
            manifest = build_manifest({**fields, "parents": parents}, version=version, **fixed)
            data = manifest.model_dump_json(indent=2).encode() + b"\n"
            atomic_write_bytes(staging.dir / "manifest.json", data)
            crash_point("after_manifest")
            publish_version(staging, task_dir, version)
            crash_point("after_rename")
            ref = f"{staging.task}@{version}"
            demoted = {v: "archived" for v, s in task_status.versions.items() if s == "active" and status == "active"}
            events = [audit.make_event(action="commit", ref=ref, to=status, reason=reason, actor=actor, method=manifest.method)]
            events += [
                audit.make_event(action="status", ref=f"{staging.task}@{v}", from_="active", to="archived",
                                 reason=f"superseded by {ref}", actor=actor)
                for v in demoted
            ]
            task_status.versions.update({**demoted, version: status})
            task_status.manifests[version] = sha256_bytes(data)
            task_status.last_version = version
            record = make_record(manifest, status, task_dir / f"v{version}")
            self._record_change(staging.task, task_status, events, "", upsert=[record], statuses=demoted)
        logger.info("committed %s (%s, %s)", record.ref, manifest.method, status)
        return record

    def _record_change(
        self, task: str, task_status: TaskStatus, events: builtins.list[dict[str, Any]], crash: str, **index_change: Any
    ) -> None:
        """Save ``status.json`` (owing ``events``), update the index, append the events, then clear
        the debt. Every step survives a kill: the next open pays owed events and reindexes. Holds the lock."""
        path = self._status_path(task)
        task_status.generation += 1
        task_status.owed_audit = events
        save_task_status(path, task_status)
        crash_point(f"{crash}after_status")
        try:
            self._index.update_task(task, task_status.generation, self._version_dirs(task), crash=f"{crash}in_index", **index_change)
        except sqlite3.DatabaseError as exc:  # the change is durable in status.json; the rebuild pays the events
            logger.warning("the index is damaged (%s); rebuilding it from the manifests", exc)
            self._rebuild_all()
            return
        crash_point(f"{crash}after_index")
        for event in events:
            audit.append_prepared(self._audit_path, event)
        crash_point(f"{crash}after_audit")
        task_status.owed_audit = []
        save_task_status(path, task_status)  # same generation: the index stays fresh

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in STATUSES:
            raise RegistryError(f"unknown status {status!r}", hint=f"use one of: {', '.join(STATUSES)}")

    def set_status(self, ref: AdapterRef | str, status: str, reason: str, *, actor: str = "cladapt") -> VersionRecord:
        """Promote, reject, archive or roll back one version; audited.

        Making a version ``active`` archives the task's previous active version (one active per task).
        """
        self._check_status(status)
        with self._lock:
            self._refuse_links()
            rec = self.get(ref)
            task_status = load_task_status(self._status_path(rec.task))
            old = task_status.versions.get(rec.version, rec.status)
            if old == status:
                logger.info("%s is already %s", rec.ref, status)
                return rec
            changes = {v: "archived" for v, s in task_status.versions.items() if s == "active" and status == "active"}
            changes[rec.version] = status
            events = [audit.make_event(action="status", ref=str(rec.ref), from_=old, to=status, reason=reason, actor=actor)]
            events += [
                audit.make_event(action="status", ref=f"{rec.task}@{v}", from_="active", to="archived",
                                 reason=f"superseded by {rec.ref}", actor=actor)
                for v in sorted(changes.keys() - {rec.version})
            ]
            task_status.versions.update(changes)
            self._record_change(rec.task, task_status, events, "status:", statuses=changes)
            return self.get(rec.ref)

    def remove(self, ref: AdapterRef | str, *, force: bool = False, reason: str = "", actor: str = "cladapt") -> None:
        """Delete one version (an explicit ``task@N``); audited.

        Raises:
            Conflict: another version lists it in ``parents`` (named in the message), unless ``force``.
        """
        r = coerce_ref(ref)
        if r.version is None:
            raise RegistryError(f"remove needs an explicit version, got {r}", hint=f"write e.g. '{r.task}@1'")
        with self._lock:
            self._refuse_links()
            rec = self.get(r)
            dependants = self._query(lambda: self._index.dependants(rec.task, rec.version))
            if dependants and not force:
                raise Conflict(
                    f"{rec.ref} is a parent of {', '.join(dependants)}",
                    hint="remove those versions first, or force it (their lineage will then point at a removed version)",
                )
            trash = self._work_dir("trash") / uuid.uuid4().hex
            os.rename(rec.path, trash)  # atomic: the version is either fully there or gone
            fsync_dir(rec.path.parent)
            crash_point("remove:after_rename")
            task_status = load_task_status(self._status_path(rec.task))
            task_status.versions.pop(rec.version, None)
            task_status.manifests.pop(rec.version, None)
            why = reason or ("forced; dependants: " + ", ".join(dependants) if dependants else "removed")
            events = [audit.make_event(action="remove", ref=str(rec.ref), from_=rec.status, to=None, reason=why, actor=actor)]
            self._record_change(rec.task, task_status, events, "remove:", delete=[rec.version])
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("removed %s", rec.ref)


def read_only_error(path: Path, exc: OSError) -> RegistryError:
    """The error for a registry that cannot be written here (read-only mount, permissions, full disk)."""
    return RegistryError(
        f"cannot write {path}: {exc.strerror or exc} (the registry is read-only here?)",
        hint="on a read-only mount or without write permission, listing and serving work; training and "
        "changes need write access to the registry folder",
    )
