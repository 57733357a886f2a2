"""The adapter store: the single source of truth between training, evaluation and serving.

On-disk layout (``format`` 1)::

    <root>/cladapt-registry.json        {"format": 1}; marks the folder as a registry
    <root>/index.sqlite                 derived listing cache; rebuilt from manifests when stale
    <root>/audit.jsonl                  append-only log of every change
    <root>/policy.json                  optional admission policy (atomic, audited)
    <root>/tasks/<task>/status.json     version -> status (+ generation, last_version); atomic replace
    <root>/tasks/<task>/v<N>/           manifest.json, adapter/, sidecars/ (immutable), evals/ (mutable)
    <root>/shared/<kind>/<key>/         state shared by tasks, with its own sha256 manifest
    <root>/.work/                       scratch, NOT registry state: staging/, runs/, trash/, lock

A commit is: stage (no lock) -> hash + fsync (no lock) -> under the lock: allocate ``N``, write
``manifest.json``, rename the staging directory to ``v<N>`` (the commit point), update
``status.json``, the index and the audit log. A process killed before the rename leaves only
``.work`` debris; one killed after it leaves a version the index does not know yet, which the next
:meth:`Store.open` / :meth:`Store.list` / :meth:`Store.get` detects (per task: version directories
and ``status.json`` generation vs. the index) and repairs (:meth:`Index.rebuild`).

Test seam: the environment variable ``CLADAPT_TEST_CRASH_AT`` (``after_manifest``,
``before_rename``, ``after_rename``, ``after_status``, ``after_index``) makes :meth:`Store.commit`
SIGKILL its own process at that point, so tests can prove crash safety. Never set it otherwise.
"""

from __future__ import annotations

import builtins
import difflib
import json
import logging
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import Conflict, IncompatibleBaseModel, IntegrityError, NotFound, RegistryError
from cladapt.registry import audit
from cladapt.registry.annotations import StoreAnnotations
from cladapt.registry.fsio import atomic_write_bytes, dumps_json, fsync_dir
from cladapt.registry.index import INDEX_FILE, Index, version_dirs
from cladapt.registry.lock import StoreLock
from cladapt.registry.maintenance import StoreMaintenance
from cladapt.registry.manifest import (
    STATUSES,
    Problem,
    VersionRecord,
    load_task_status,
    make_record,
    read_verified,
    save_task_status,
    unlisted_files,
    verify_entries,
)
from cladapt.registry.refs import (
    AdapterRef,
    coerce_ref,
    validate_filename,
    validate_shared_key,
    validate_task_name,
)
from cladapt.registry.staging import (
    Staging,
    build_manifest,
    collect_files,
    crash_point,
    publish_version,
)

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["FORMAT", "Problem", "Staging", "Store"]

logger = logging.getLogger(__name__)

FORMAT = 1
MARKER = "cladapt-registry.json"


class Store(StoreAnnotations, StoreMaintenance):
    """A registry of adapter versions rooted at one directory. Create with :meth:`init` / :meth:`open`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.tasks_dir = self.root / "tasks"
        self.work_dir = self.root / ".work"
        self._audit_path = self.root / audit.AUDIT_FILE
        self._index = Index(self.root / INDEX_FILE, self.tasks_dir)
        self._lock = StoreLock.for_path(self.work_dir / "lock")

    # ------------------------------------------------------------------ opening

    @classmethod
    def init(cls, root: Path | str, *, exist_ok: bool = False) -> Store:
        """Create an empty registry at ``root`` (an absent or empty directory).

        Raises:
            Conflict: a registry already exists there and ``exist_ok`` is False.
            RegistryError: ``root`` is a non-empty directory that is not a registry.
        """
        path = Path(root)
        if (path / MARKER).exists():
            if exist_ok:
                return cls.open(path)
            raise Conflict(f"a registry already exists at {path}", hint="open it instead, or pass exist_ok=True")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RegistryError(f"cannot create a registry in {path}: it exists and is not empty", hint="choose a new or empty directory")
        store = cls(path)
        for sub in (store.tasks_dir, store.root / "shared", *store._work_dirs()):
            sub.mkdir(parents=True, exist_ok=True)
        store._index.reset()
        store._audit_path.touch()
        # The marker goes last: a half-initialised folder is not mistaken for a registry.
        atomic_write_bytes(store.root / MARKER, dumps_json({"format": FORMAT}))
        with store._lock:
            audit.append_event(store._audit_path, action="init", ref=None, reason=f"format {FORMAT}")
        logger.info("initialised registry at %s", store.root)
        return store

    @classmethod
    def open(cls, root: Path | str) -> Store:
        """Open an existing registry, repairing the index if a commit was interrupted.

        Raises:
            NotFound: no registry at ``root``.
            RegistryError: the registry's format is newer than this cladapt.
        """
        path = Path(root)
        marker = path / MARKER
        if not marker.is_file():
            raise NotFound(f"no cladapt registry at {path}", hint=f"create one with `cladapt registry init {path}`")
        try:
            fmt = json.loads(marker.read_bytes())["format"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"{marker}: unreadable registry marker ({exc})", hint=f"it should contain {{\"format\": {FORMAT}}}") from exc
        if not isinstance(fmt, int) or fmt < 1:
            raise RegistryError(f"{marker}: invalid format {fmt!r}", hint=f"it should contain {{\"format\": {FORMAT}}}")
        if fmt > FORMAT:
            raise RegistryError(
                f"the registry at {path} has format {fmt}, newer than this cladapt understands ({FORMAT})",
                hint="upgrade cladapt (pip install -U cladapt) to use this registry",
            )
        store = cls(path)
        for sub in store._work_dirs():  # .work is scratch: recreate it if someone deleted it
            try:
                sub.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only mount can still be listed and served
                logger.warning("cannot create %s (%s); this registry is read-only here", sub, exc)
        if store._index.usable():
            store._sync()
        else:
            with store._lock:
                if not store._index.usable():  # another process may have rebuilt it meanwhile
                    store._rebuild_all()
        return store

    def _work_dirs(self) -> list[Path]:
        return [self.work_dir / "staging", self.work_dir / "runs", self.work_dir / "trash"]

    # ------------------------------------------------------------------ paths and index freshness

    def _task_dir(self, task: str) -> Path:
        return self.tasks_dir / validate_task_name(task)

    def _status_path(self, task: str) -> Path:
        return self._task_dir(task) / "status.json"

    def _version_dirs(self, task: str) -> frozenset[int]:
        return version_dirs(self._task_dir(task))

    def _sync(self, task: str | None = None) -> builtins.list[Problem]:
        """Cheap staleness check (directory scan + status generations); reindex stale tasks.

        Returns the problems met while reindexing (logged; ``verify`` reports them).
        """
        try:
            if not self._index.stale(task):
                return []
        except sqlite3.DatabaseError:  # the index was deleted or damaged after open()
            with self._lock:
                return [] if self._index.usable() else self._rebuild_all()
        with self._lock:
            stale = self._index.stale(task)  # re-check: a live committer may just have finished
            if not stale:
                return []
            names = sorted(stale)
            logger.warning("index is stale for %d task(s) %s (interrupted commit?); reindexing", len(names), names[:10])
            problems = self._reindex(stale)
        for problem in problems:
            logger.warning("reindex: %s", problem)
        return problems

    def _reindex(self, tasks: Iterable[str]) -> builtins.list[Problem]:
        """Rebuild the index rows of ``tasks`` from disk, auditing every repair. Holds the lock."""
        with self._lock:
            return self._index.rebuild(tasks, lambda *event: self._audit(*event, actor="cladapt"))

    def _rebuild_all(self) -> builtins.list[Problem]:
        """Rebuild the whole index from the manifests, swapping it in atomically. Holds the lock."""
        with self._lock:
            return self._index.rebuild_all(lambda *event: self._audit(*event, actor="cladapt"))

    def _audit(self, action: str, ref: str | None, from_: Any, to: Any, reason: str, *, actor: str, **extra: Any) -> None:
        audit.append_event(self._audit_path, action=action, ref=ref, from_=from_, to=to, reason=reason, actor=actor, **extra)

    # ------------------------------------------------------------------ reading

    def list(self, task: str | None = None, *, include_rejected: bool = True) -> builtins.list[VersionRecord]:
        """Versions ordered by task then version, from the index (repaired first if stale)."""
        if task is not None:
            validate_task_name(task)
        self._sync(task)
        statuses = None if include_rejected else [s for s in STATUSES if s != "rejected"]
        return self._index.records(task, statuses=statuses)

    def tasks(self) -> builtins.list[str]:
        """Names of tasks with at least one version."""
        self._sync()
        return self._index.tasks()

    def get(self, ref: AdapterRef | str, *, base_fingerprint: str | None = None) -> VersionRecord:
        """Resolve a ref: ``task@N``; ``task@latest`` (highest number); ``task`` = the active version,
        or the newest non-rejected one when none is active.

        Args:
            base_fingerprint: when given, the version must have been trained on this base model.

        Raises:
            NotFound: no such task or version (the hint lists what exists).
            IncompatibleBaseModel: ``base_fingerprint`` differs from the version's.
        """
        r = coerce_ref(ref)
        self._sync(r.task)
        if r.version is not None:
            found = self._index.records(r.task, version=r.version)
        elif r.latest:
            found = self._index.records(r.task, newest=True)
        else:
            found = self._index.records(r.task, statuses=["active"], newest=True)
            found = found or self._index.records(r.task, statuses=["candidate", "archived"], newest=True)
        if not found:
            raise self._not_found(r)
        record = found[0]
        if base_fingerprint is not None and record.base_fingerprint != base_fingerprint:
            raise IncompatibleBaseModel(
                f"{record.ref} was trained on base model {record.manifest.base_model.get('id')!r} "
                f"(fingerprint {record.base_fingerprint[:16]}), not on fingerprint {base_fingerprint[:16]}",
                hint="load the base model it was trained on, or train the task again on this base model",
            )
        return record

    def _not_found(self, ref: AdapterRef) -> NotFound:
        versions = [str(rec.ref) for rec in self._index.records(ref.task)]
        if versions:
            return NotFound(f"no version {ref} in the registry", hint=f"versions of {ref.task}: {', '.join(versions[-20:])}")
        close = difflib.get_close_matches(ref.task, self._index.tasks(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see `cladapt list`"
        return NotFound(f"no task {ref.task!r} in the registry at {self.root}", hint=hint)

    def active(self, task: str) -> VersionRecord | None:
        """The active version of ``task``, or None."""
        validate_task_name(task)
        self._sync(task)
        found = self._index.records(task, statuses=["active"], newest=True)
        return found[0] if found else None

    def adapter_dir(self, ref: AdapterRef | str) -> Path:
        """The version's ``adapter/`` folder (a plain PEFT LoRA), after checking every file's sha256.

        Raises:
            IntegrityError: a file differs from the manifest, or an unlisted file sits in the folder.
        """
        rec = self.get(ref)
        verify_entries(rec.path, [e for e in rec.manifest.files if e.path.startswith("adapter/")], rec.ref)
        extra = unlisted_files(rec.path, rec.manifest, "adapter")
        if extra:
            raise IntegrityError(f"{rec.ref}: unlisted file(s) in adapter/: {extra}", hint="remove them; they were not committed")
        return rec.path / "adapter"

    def sidecar_path(self, ref: AdapterRef | str, name: str) -> Path:
        """Path of a verified sidecar file (``signature.safetensors``, or ``signature`` if unambiguous)."""
        validate_filename(name, what="sidecar name")
        rec = self.get(ref)
        entry = rec.manifest.find(f"sidecars/{name}", rec.ref)
        verify_entries(rec.path, [entry], rec.ref)
        return rec.path / entry.path

    def read_json(self, ref: AdapterRef | str, relpath: str) -> dict[str, Any]:
        """Verified read of a JSON object stored in the version (a bare name means ``sidecars/<name>``)."""
        rec = self.get(ref)
        entry = rec.manifest.find(relpath, rec.ref)
        try:
            obj = json.loads(read_verified(rec.path, entry, rec.ref))
        except ValueError as exc:
            raise IntegrityError(f"{rec.ref}: {entry.path!r} is not valid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise RegistryError(f"{rec.ref}: {entry.path!r} holds a {type(obj).__name__}, not a JSON object")
        return obj

    def read_tensors(self, ref: AdapterRef | str, relpath: str) -> dict[str, Tensor]:
        """Verified load of a safetensors file stored in the version (hash checked on the same bytes)."""
        from safetensors.torch import load

        rec = self.get(ref)
        entry = rec.manifest.find(relpath, rec.ref)
        if not entry.path.endswith(".safetensors"):
            raise RegistryError(f"{rec.ref}: {entry.path!r} is not a safetensors file")
        return load(read_verified(rec.path, entry, rec.ref))

    # ------------------------------------------------------------------ writing

    def stage(self, task: str) -> Staging:
        """A new private staging directory for one version of ``task``; no lock is taken."""
        validate_task_name(task)
        return Staging.create(task, self.work_dir / "staging" / uuid.uuid4().hex)

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
            self._sync(staging.task)
            parents = [str(self.get(p).ref) for p in raw_parents]
            task_status = load_task_status(self._status_path(staging.task))
            version = max([task_status.last_version, *self._version_dirs(staging.task)]) + 1
            manifest = build_manifest({**fields, "parents": parents}, version=version, **fixed)
            atomic_write_bytes(staging.dir / "manifest.json", manifest.model_dump_json(indent=2).encode() + b"\n")
            crash_point("after_manifest")
            publish_version(staging, self._task_dir(staging.task), version)
            crash_point("after_rename")
            demoted = {v: "archived" for v, s in task_status.versions.items() if s == "active" and status == "active"}
            task_status.versions.update({**demoted, version: status})
            task_status.last_version = version
            task_status.generation += 1
            save_task_status(self._status_path(staging.task), task_status)
            crash_point("after_status")
            record = make_record(manifest, status, self._task_dir(staging.task) / f"v{version}")
            dirs = self._version_dirs(staging.task)
            self._index.update_task(staging.task, task_status.generation, dirs, upsert=[record], statuses=demoted)
            crash_point("after_index")
            self._audit("commit", str(record.ref), None, status, reason, actor=actor, method=manifest.method)
            for v in demoted:
                self._audit("status", f"{staging.task}@{v}", "active", "archived", f"superseded by {record.ref}", actor=actor)
        logger.info("committed %s (%s, %s)", record.ref, manifest.method, status)
        return record

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
            rec = self.get(ref)
            task_status = load_task_status(self._status_path(rec.task))
            old = task_status.versions.get(rec.version, rec.status)
            if old == status:
                logger.info("%s is already %s", rec.ref, status)
                return rec
            changes = {v: "archived" for v, s in task_status.versions.items() if s == "active" and status == "active"}
            changes[rec.version] = status
            task_status.versions.update(changes)
            task_status.generation += 1
            save_task_status(self._status_path(rec.task), task_status)
            self._index.update_task(rec.task, task_status.generation, self._version_dirs(rec.task), statuses=changes)
            self._audit("status", str(rec.ref), old, status, reason, actor=actor)
            for v in changes.keys() - {rec.version}:
                self._audit("status", f"{rec.task}@{v}", "active", "archived", f"superseded by {rec.ref}", actor=actor)
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
            rec = self.get(r)
            dependants = self._index.dependants(rec.task, rec.version)
            if dependants and not force:
                raise Conflict(
                    f"{rec.ref} is a parent of {', '.join(dependants)}",
                    hint="remove those versions first, or force it (their lineage will then point at a removed version)",
                )
            trash = self.work_dir / "trash" / uuid.uuid4().hex
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(rec.path, trash)  # atomic: the version is either fully there or gone
            fsync_dir(rec.path.parent)
            task_status = load_task_status(self._status_path(rec.task))
            task_status.versions.pop(rec.version, None)
            task_status.generation += 1
            save_task_status(self._status_path(rec.task), task_status)
            self._index.update_task(rec.task, task_status.generation, self._version_dirs(rec.task), delete=[rec.version])
            why = reason or ("forced; dependants: " + ", ".join(dependants) if dependants else "removed")
            self._audit("remove", str(rec.ref), rec.status, None, why, actor=actor)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("removed %s", rec.ref)

    # ------------------------------------------------------------------ maintenance

    def run_dir(self, task: str, run_id: str) -> Path:
        """A scratch folder ``.work/runs/<task>/<run_id>`` for checkpoints (created; not registry state)."""
        path = self.work_dir / "runs" / validate_task_name(task) / validate_shared_key(run_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"
