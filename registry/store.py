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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import Conflict, IncompatibleBaseModel, IntegrityError, NotFound, RegistryError
from cladapt.registry import audit
from cladapt.registry.annotations import StoreAnnotations
from cladapt.registry.changes import StoreChanges
from cladapt.registry.fsio import (
    atomic_write_bytes,
    dumps_json,
    read_nofollow,
    refuse_symlinks,
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
)
from cladapt.registry.status import STATUSES, TaskStatus, load_task_status

if TYPE_CHECKING:
    from torch import Tensor


__all__ = ["FORMAT", "Problem", "RunFolder", "Staging", "Store"]

logger = logging.getLogger(__name__)

FORMAT = 1
MARKER = "cladapt-registry.json"


class Store(StoreChanges, StoreIndexing, StoreAnnotations, StoreMaintenance, StoreRuns):
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
