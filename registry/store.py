"""The adapter store: the single source of truth between training, evaluation and serving.

On-disk layout (``format`` 1)::

    <root>/cladapt-registry.json        {"format": 1}; marks the folder as a registry
    <root>/index.sqlite                 derived listing cache; rebuilt from manifests when stale or damaged
    <root>/audit.jsonl                  append-only, hash-chained log of every change
    <root>/policy.json                  optional admission policy (atomic, audited, checksummed)
    <root>/tasks/<task>/status.json     version -> status, manifest sha256s, generation; checksummed
    <root>/tasks/<task>/v<N>/           manifest.json, adapter/, sidecars/ (immutable), evals/ (mutable)
    <root>/shared/<kind>/<key>/         state shared by tasks, with its own sha256 manifest
    <root>/.work/                       scratch, NOT registry state: staging/, runs/, trash/, lock

A commit is: stage (no lock) -> hash + fsync (no lock) -> under the lock: allocate ``N``, write
``manifest.json``, rename the staging directory to ``v<N>`` (the commit point), update
``status.json`` (with the audit events it owes), the index, then the audit log, then clear the
owed events. A process killed before the rename leaves only ``.work`` debris (``registry gc``);
one killed after it leaves a version the index does not know yet, or events the log has not got,
which the next :meth:`Store.open` / :meth:`Store.list` / :meth:`Store.get` detects (per task:
version directories and ``status.json`` generation vs. the index) and repairs (:meth:`Index.rebuild`).
Status changes and removals follow the same recipe.

Reads never trust the index alone: rows carry checksums, a damaged index (or one with a killed
writer's journal) is rebuilt from the manifests, and :meth:`Store.get` chooses the version from
``status.json`` and checks the index row against the version's own ``manifest.json``, whose
sha256 ``status.json`` records. Nothing below the root may be a symbolic link.

Test seam: the environment variable ``CLADAPT_TEST_CRASH_AT`` makes the store SIGKILL its own
process at one step, so tests can prove crash safety (never set it otherwise). Commit:
``after_manifest``, ``before_rename``, ``after_rename``, ``after_status``, ``in_index`` (inside the
index transaction), ``after_index``, ``after_audit``; status changes (promote, rollback): the same
last five prefixed ``status:``; removals: ``remove:after_rename`` and the last five prefixed ``remove:``.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import Conflict, IncompatibleBaseModel, IntegrityError, NotFound, RegistryError
from cladapt.registry import audit
from cladapt.registry.annotations import StoreAnnotations
from cladapt.registry.fsio import (
    atomic_write_bytes,
    crash_point,
    dumps_json,
    fsync_dir,
    read_nofollow,
    refuse_symlinks,
    sha256_bytes,
)
from cladapt.registry.index import INDEX_FILE, Index, version_dirs
from cladapt.registry.lock import StoreLock
from cladapt.registry.maintenance import StoreMaintenance
from cladapt.registry.manifest import (
    Problem,
    VersionRecord,
    make_record,
    read_manifest,
    read_verified,
    unlisted_files,
    verify_entries,
)
from cladapt.registry.refs import (
    AdapterRef,
    coerce_ref,
    validate_filename,
    validate_task_name,
)
from cladapt.registry.repair import StoreIndexing
from cladapt.registry.runs import RunFolder, StoreRuns
from cladapt.registry.staging import (
    Staging,
    build_manifest,
    collect_files,
    publish_version,
)
from cladapt.registry.status import STATUSES, TaskStatus, load_task_status, save_task_status

if TYPE_CHECKING:
    from torch import Tensor


__all__ = ["FORMAT", "Problem", "RunFolder", "Staging", "Store"]

logger = logging.getLogger(__name__)

FORMAT = 1
MARKER = "cladapt-registry.json"


class Store(StoreIndexing, StoreAnnotations, StoreMaintenance, StoreRuns):
    """A registry of adapter versions rooted at one directory. Create with :meth:`init` / :meth:`open`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.tasks_dir = self.root / "tasks"
        self.work_dir = self.root / ".work"
        self._audit_path = self.root / audit.AUDIT_FILE
        self._index = Index(self.root / INDEX_FILE, self.tasks_dir)
        self._lock = StoreLock.for_path(self.work_dir / "lock", root=self.root)

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
            RegistryError: the registry's format is newer than this cladapt, or its marker is a link.
        """
        path = Path(root)
        marker = path / MARKER
        if not marker.is_file() or marker.is_symlink():
            if marker.is_symlink():
                raise RegistryError(f"{marker} is a symbolic link", hint="a registry's files must be real files")
            raise NotFound(f"no cladapt registry at {path}", hint=f"create one with `cladapt registry init {path}`")
        try:
            fmt = json.loads(read_nofollow(marker))["format"]
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
                refuse_symlinks(store.root, sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only mount can still be listed and served
                logger.warning("cannot create %s (%s); this registry is read-only here", sub, exc)
            except RegistryError as exc:  # a planted link: reading still works, writing there is refused
                logger.warning("%s", exc.message)
        store._sync()
        return store

    def _work_dirs(self) -> builtins.list[Path]:
        return [self.work_dir / "staging", self.work_dir / "runs", self.work_dir / "trash"]

    def _work_dir(self, name: str) -> Path:
        """``.work/<name>``, created, refusing links (scratch is still inside the registry)."""
        path = refuse_symlinks(self.root, self.work_dir / name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ paths and index freshness

    def _task_dir(self, task: str) -> Path:
        return refuse_symlinks(self.root, self.tasks_dir / validate_task_name(task))

    def _status_path(self, task: str) -> Path:
        return self._task_dir(task) / "status.json"

    def _version_dirs(self, task: str) -> frozenset[int]:
        return version_dirs(self._task_dir(task))

    def _refuse_links(self) -> None:
        """Before a change writes anything: refuse a link at the audit log (it is written last,
        after the change is durable, so finding out then would leave the change unlogged)."""
        refuse_symlinks(self.root, self._audit_path)

    def _audit(self, action: str, ref: str | None, from_: Any, to: Any, reason: str, *, actor: str, **extra: Any) -> None:
        audit.append_event(self._audit_path, action=action, ref=ref, from_=from_, to=to, reason=reason, actor=actor, **extra)

    # ------------------------------------------------------------------ reading

    def list(self, task: str | None = None, *, include_rejected: bool = True) -> builtins.list[VersionRecord]:
        """Versions ordered by task then version, from the index (repaired first if stale)."""
        if task is not None:
            self._task_dir(task)
        self._sync(task)
        statuses = None if include_rejected else [s for s in STATUSES if s != "rejected"]
        return self._query(lambda: self._index.records(task, statuses=statuses))

    def unlisted(self, task: str | None = None) -> builtins.list[Problem]:
        """Versions on disk that :meth:`list` leaves out because their manifest cannot be used
        (unreadable, from a newer cladapt, or not matching its recorded sha256), with the reason."""
        self._sync(task)
        links = [Problem(f"tasks/{e.name}", "is a symbolic link, never adopted as a task (see `cladapt registry verify`)")
                 for e in sorted(os.scandir(self.tasks_dir), key=lambda e: e.name)
                 if e.is_symlink() and (task is None or e.name == task)] if self.tasks_dir.is_dir() else []
        return links + self._query(lambda: self._index.skipped(task))

    def tasks(self) -> builtins.list[str]:
        """Names of tasks with at least one version."""
        self._sync()
        return self._query(self._index.tasks)

    def get(self, ref: AdapterRef | str, *, base_fingerprint: str | None = None) -> VersionRecord:
        """Resolve a ref: ``task@N``; ``task@latest`` (highest number); ``task`` = the active version,
        or the newest non-rejected one when none is active.

        The version is chosen from ``status.json`` (the source of truth), and the index row is
        checked against that version's own ``manifest.json`` (whose sha256 ``status.json``
        records) before it is returned; a disagreeing index is rebuilt for the task.

        Args:
            base_fingerprint: when given, the version must have been trained on this base model.

        Raises:
            NotFound: no such task or version (the hint lists what exists).
            IntegrityError: the version's manifest is unreadable or does not match its sha256.
            IncompatibleBaseModel: ``base_fingerprint`` differs from the version's.
        """
        r = coerce_ref(ref)
        record = self._resolve(r)
        if record is None:
            raise self._not_found(r)
        if base_fingerprint is not None and record.base_fingerprint != base_fingerprint:
            raise IncompatibleBaseModel(
                f"{record.ref} was trained on base model {record.manifest.base_model.get('id')!r} "
                f"(fingerprint {record.base_fingerprint[:16]}), not on fingerprint {base_fingerprint[:16]}",
                hint="load the base model it was trained on, or train the task again on this base model",
            )
        return record

    def _resolve(self, r: AdapterRef, *, statuses: tuple[str, ...] | None = None) -> VersionRecord | None:
        """The checked record ``r`` names (``statuses``: only ``task``'s active version), or None."""
        self._task_dir(r.task)
        self._sync(r.task)
        for attempt in range(2):
            status = load_task_status(self._status_path(r.task))
            version = _choose(r, status.versions, statuses)
            if version is None:
                return None
            record = self._checked_record(r.task, version, status)
            if record is not None:
                return record
            if attempt == 0:
                logger.warning("the index disagrees with tasks/%s/v%d; reindexing the task", r.task, version)
                with self._lock:
                    problems = self._reindex([r.task])
                for problem in problems:
                    logger.warning("reindex: %s", problem)
        raise IntegrityError(
            f"the index keeps disagreeing with {r.task}@{version}'s manifest and status",
            hint="run `cladapt registry verify --reindex`",
        )

    def _checked_record(self, task: str, version: int, status: TaskStatus) -> VersionRecord | None:
        """The index row of ``task@version`` if it matches the version's manifest and status, else None.

        Raises:
            IntegrityError: the manifest itself is unreadable or differs from its recorded sha256.
        """
        rows = self._query(lambda: self._index.records(task, version=version))
        path = self._task_dir(task) / f"v{version}"
        refuse_symlinks(self.root, path)
        manifest, digest = read_manifest(path / "manifest.json")
        recorded = status.manifests.get(version)
        if recorded is not None and digest != recorded:
            raise IntegrityError(
                f"{task}@{version}: {path / 'manifest.json'} does not match the sha256 recorded in status.json",
                hint="the manifest was damaged or edited; restore it from a backup or pull the version again",
            )
        if not rows:
            return None
        expected = make_record(manifest, status.versions[version], path)
        return rows[0] if rows[0] == expected and rows[0].manifest == manifest else None

    def _not_found(self, ref: AdapterRef) -> NotFound:
        versions = [str(rec.ref) for rec in self._query(lambda: self._index.records(ref.task))]
        if versions:
            return NotFound(f"no version {ref} in the registry", hint=f"versions of {ref.task}: {', '.join(versions[-20:])}")
        close = difflib.get_close_matches(ref.task, self._query(self._index.tasks), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see `cladapt list` for the tasks and versions"
        return NotFound(f"no task {ref.task!r} in the registry at {self.root}", hint=hint)

    def active(self, task: str) -> VersionRecord | None:
        """The active version of ``task``, or None."""
        return self._resolve(AdapterRef(task), statuses=("active",))

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
        try:
            return Staging.create(task, self._work_dir("staging") / uuid.uuid4().hex)
        except OSError as exc:
            raise _read_only(self.work_dir / "staging", exc) from exc

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

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"


def _choose(r: AdapterRef, versions: dict[int, str], statuses: tuple[str, ...] | None = None) -> int | None:
    """The version number ``r`` names in a task's statuses (see :meth:`Store.get`), or None."""
    if r.version is not None:
        return r.version if r.version in versions else None
    if r.latest:
        return max(versions, default=None)
    active = [v for v, s in versions.items() if s == "active"]
    if active or statuses is not None:
        return max(active, default=None)
    return max((v for v, s in versions.items() if s in ("candidate", "archived")), default=None)


def _read_only(path: Path, exc: OSError) -> RegistryError:
    """The error for a registry that cannot be written here (read-only mount, permissions, full disk)."""
    return RegistryError(
        f"cannot write {path}: {exc.strerror or exc} (the registry is read-only here?)",
        hint="on a read-only mount or without write permission, listing and serving work; training and "
        "changes need write access to the registry folder",
    )
