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
and ``status.json`` generation vs. the index) and repairs (see :mod:`cladapt.registry.repair`
notes in :meth:`Store._reindex`).

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
import re
import shutil
import signal
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import Conflict, IncompatibleBaseModel, IntegrityError, NotFound, RegistryError
from cladapt.registry import audit
from cladapt.registry.fsio import atomic_write_bytes, dumps_json, fsync_dir, is_tmp_name
from cladapt.registry.index import INDEX_FILE, Index
from cladapt.registry.lock import StoreLock
from cladapt.registry.manifest import (
    STATUSES,
    FileEntry,
    Manifest,
    Problem,
    TaskStatus,
    VersionRecord,
    load_manifest,
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
    validate_name,
    validate_relpath,
    validate_shared_key,
    validate_task_name,
)
from cladapt.registry.staging import Staging, build_manifest, collect_files, stage_shared, verify_shared

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["FORMAT", "Problem", "Staging", "Store"]

logger = logging.getLogger(__name__)

FORMAT = 1
MARKER = "cladapt-registry.json"
CRASH_ENV = "CLADAPT_TEST_CRASH_AT"
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")
_TASK_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _crash_point(name: str) -> None:
    """Test seam: SIGKILL this process at ``name`` when CLADAPT_TEST_CRASH_AT says so."""
    if os.environ.get(CRASH_ENV) == name:
        logger.warning("%s=%s: killing this process on purpose", CRASH_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


class Store:
    """A registry of adapter versions rooted at one directory. Create with :meth:`init` / :meth:`open`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.tasks_dir = self.root / "tasks"
        self.work_dir = self.root / ".work"
        self._audit_path = self.root / audit.AUDIT_FILE
        self._index = Index(self.root / INDEX_FILE, self.tasks_dir)
        self._lock = StoreLock(self.work_dir / "lock")

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
            sub.mkdir(parents=True, exist_ok=True)
        if store._index.ensure():
            with store._lock:
                store._reindex(store._disk_tasks())
        else:
            store._sync()
        return store

    def _work_dirs(self) -> list[Path]:
        return [self.work_dir / "staging", self.work_dir / "runs", self.work_dir / "trash"]

    # ------------------------------------------------------------------ paths and disk state

    def _task_dir(self, task: str) -> Path:
        return self.tasks_dir / validate_task_name(task)

    def _status_path(self, task: str) -> Path:
        return self._task_dir(task) / "status.json"

    def _version_dirs(self, task: str) -> frozenset[int]:
        try:
            entries = list(os.scandir(self._task_dir(task)))
        except FileNotFoundError:
            return frozenset()
        return frozenset(
            int(m.group(1)) for e in entries if (m := _VERSION_DIR.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)
        )

    def _disk_tasks(self) -> builtins.list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.tasks_dir) if _TASK_DIR.fullmatch(e.name) and e.is_dir())
        except FileNotFoundError:
            return []

    def _disk_state(self, task: str | None) -> dict[str, tuple[int, frozenset[int]]]:
        state: dict[str, tuple[int, frozenset[int]]] = {}
        for name in [task] if task is not None else self._disk_tasks():
            if not self._task_dir(name).is_dir():
                continue
            try:
                generation = load_task_status(self._status_path(name)).generation
            except IntegrityError:
                generation = -2  # never equal to the index: forces a repair
            state[name] = (generation, self._version_dirs(name))
        return state

    # ------------------------------------------------------------------ index freshness

    def _stale(self, task: str | None) -> set[str]:
        disk, indexed = self._disk_state(task), self._index.state(task)
        return {t for t in disk.keys() | indexed.keys() if disk.get(t) != indexed.get(t)}

    def _sync(self, task: str | None = None) -> None:
        """Cheap staleness check (directory scan + status generations); reindex stale tasks."""
        if not self._stale(task):
            return
        with self._lock:
            stale = self._stale(task)  # re-check: a live committer may just have finished
            if stale:
                logger.warning("index is stale for %s (interrupted commit?); reindexing", sorted(stale))
                self._reindex(stale)

    def _reindex(self, tasks: set[str] | builtins.list[str], *, actor: str = "cladapt") -> builtins.list[Problem]:
        """Rebuild the index rows of ``tasks`` from disk, repairing ``status.json`` on the way.

        Repairs (each audited as ``recover``): a version directory without a status (a commit
        killed after its rename) becomes ``candidate``, never silently ``active``; a status entry
        without a directory (a remove killed after its rename) is dropped; an unreadable
        ``status.json`` is rebuilt from the index's statuses (else ``candidate``). Must hold the lock.
        """
        assert self._lock.held, "reindex requires the registry lock"
        problems: builtins.list[Problem] = []
        batch: dict[str, tuple[int, frozenset[int], builtins.list[VersionRecord]]] = {}
        for task in sorted(tasks):
            task_dir = self._task_dir(task)
            if not task_dir.is_dir():
                batch[task] = (-1, frozenset(), [])
                continue
            for leftover in task_dir.iterdir():
                if is_tmp_name(leftover.name):
                    leftover.unlink(missing_ok=True)
            status, changed = self._repair_status(task, problems, actor)
            dirs = self._version_dirs(task)
            records = []
            for version in sorted(dirs):
                manifest = self._load_checked_manifest(task, version, problems)
                if version not in status.versions:
                    status.versions[version] = "candidate"
                    changed = True
                    self._audit("recover", f"{task}@{version}", None, "candidate", "version found without a status", actor)
                if manifest is not None:
                    records.append(make_record(manifest, status.versions[version], task_dir / f"v{version}"))
            for version in sorted(set(status.versions) - dirs):
                self._audit("recover", f"{task}@{version}", status.versions.pop(version), None, "status without a version", actor)
                changed = True
            status.last_version = max([status.last_version, *dirs])
            if changed:
                status.generation += 1
                save_task_status(self._status_path(task), status)
            batch[task] = (status.generation, dirs, records)
        self._index.replace_tasks(batch)
        return problems

    def _repair_status(self, task: str, problems: builtins.list[Problem], actor: str) -> tuple[TaskStatus, bool]:
        try:
            return load_task_status(self._status_path(task)), False
        except IntegrityError as exc:
            problems.append(Problem(f"{task}/status.json", exc.message))
            known = {rec.version: rec.status for rec in self._index.records(task)}
            self._audit("recover", task, None, None, "status.json was unreadable; rebuilt from the index", actor)
            return TaskStatus(generation=1, versions=known), True

    def _load_checked_manifest(self, task: str, version: int, problems: builtins.list[Problem]) -> Manifest | None:
        path = self._task_dir(task) / f"v{version}" / "manifest.json"
        try:
            manifest = load_manifest(path)
        except RegistryError as exc:
            problems.append(Problem(f"{task}@{version}", exc.message))
            return None
        if (manifest.task, manifest.version) != (task, version):
            problems.append(Problem(f"{task}@{version}", f"manifest says {manifest.task}@{manifest.version}"))
            return None
        return manifest

    def _audit(self, action: str, ref: str | None, from_: Any, to: Any, reason: str, actor: str, **extra: Any) -> None:
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
        hint = f"did you mean {close[0]!r}?" if close else "see `cladapt registry list`"
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
        entry = self._file_entry(rec, f"sidecars/{name}")
        verify_entries(rec.path, [entry], rec.ref)
        return rec.path / entry.path

    def read_json(self, ref: AdapterRef | str, relpath: str) -> dict[str, Any]:
        """Verified read of a JSON object stored in the version (a bare name means ``sidecars/<name>``)."""
        rec = self.get(ref)
        entry = self._file_entry(rec, self._relpath(relpath))
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
        entry = self._file_entry(rec, self._relpath(relpath))
        if not entry.path.endswith(".safetensors"):
            raise RegistryError(f"{rec.ref}: {entry.path!r} is not a safetensors file")
        return load(read_verified(rec.path, entry, rec.ref))

    @staticmethod
    def _relpath(relpath: str) -> str:
        relpath = validate_relpath(relpath)
        return relpath if "/" in relpath else f"sidecars/{relpath}"

    @staticmethod
    def _file_entry(rec: VersionRecord, relpath: str) -> FileEntry:
        entry = rec.manifest.file(relpath)
        if entry is None and relpath.startswith("sidecars/") and "." not in relpath[9:]:
            stem = [e for e in rec.manifest.files if e.path.startswith(relpath + ".") and "/" not in e.path[9:]]
            entry = stem[0] if len(stem) == 1 else None
        if entry is None:
            known = [e.path for e in rec.manifest.files if not e.path.startswith("adapter/")]
            raise NotFound(f"{rec.ref} has no file {relpath!r}", hint=f"its files: {', '.join(known) or '(none)'}")
        return entry

    def evaluations(self, ref: AdapterRef | str) -> dict[str, dict[str, Any]]:
        """Evaluation results attached after commit (``evals/<name>.json``), by name."""
        rec = self.get(ref)
        results: dict[str, dict[str, Any]] = {}
        evals = rec.path / "evals"
        for path in sorted(evals.glob("*.json")) if evals.is_dir() else []:
            try:
                results[path.stem] = json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise IntegrityError(f"{rec.ref}: evaluation {path.name!r} is unreadable ({exc})") from exc
        return results

    def audit_log(self) -> builtins.list[dict[str, Any]]:
        """Every audit event, oldest first (torn lines are skipped with a warning)."""
        return audit.read_events(self._audit_path)[0]

    def get_policy(self) -> dict[str, Any] | None:
        """The stored admission policy, or None."""
        path = self.root / "policy.json"
        try:
            policy = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{path}: unreadable policy ({exc})", hint="set it again with set_policy") from exc
        if not isinstance(policy, dict):
            raise IntegrityError(f"{path}: the policy is not a JSON object", hint="set it again with set_policy")
        return policy

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
            _crash_point("after_manifest")
            self._publish(staging, version)
            _crash_point("after_rename")
            demoted = {v: "archived" for v, s in task_status.versions.items() if s == "active" and status == "active"}
            task_status.versions.update({**demoted, version: status})
            task_status.last_version = version
            task_status.generation += 1
            save_task_status(self._status_path(staging.task), task_status)
            _crash_point("after_status")
            record = make_record(manifest, status, self._task_dir(staging.task) / f"v{version}")
            dirs = self._version_dirs(staging.task)
            self._index.update_task(staging.task, task_status.generation, dirs, upsert=[record], statuses=demoted)
            _crash_point("after_index")
            self._audit("commit", str(record.ref), None, status, reason, actor, method=manifest.method)
            for v in demoted:
                self._audit("status", f"{staging.task}@{v}", "active", "archived", f"superseded by {record.ref}", actor)
        logger.info("committed %s (%s, %s)", record.ref, manifest.method, status)
        return record

    def _publish(self, staging: Staging, version: int) -> None:
        """Rename the staging directory into place: the commit point. Must hold the lock."""
        task_dir = self._task_dir(staging.task)
        target = task_dir / f"v{version}"
        if task_dir.is_dir():
            _crash_point("before_rename")
            os.rename(staging.dir, target)
        else:
            # A new task: build tasks/<task>/v<N> inside .work and rename the task folder into
            # place, so a crash before that rename leaves not even an empty task folder behind.
            wrapper = staging.dir.with_name(staging.dir.name + "-task")
            wrapper.mkdir()
            os.rename(staging.dir, wrapper / target.name)
            fsync_dir(wrapper)
            _crash_point("before_rename")
            os.rename(wrapper, task_dir)
            fsync_dir(self.tasks_dir)
        fsync_dir(task_dir)
        fsync_dir(staging.dir.parent)
        staging.dir = target
        staging.committed = True

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in STATUSES:
            raise RegistryError(f"unknown status {status!r}", hint=f"use one of: {', '.join(STATUSES)}")
