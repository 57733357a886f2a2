"""The SQLite index, ``<root>/index.sqlite``: a derived, rebuildable cache of manifests + statuses.

Listing 10,000 versions by opening 10,000 manifests would be slow, so every committed version is
also a row here (task, version, status, method, composition, r, alpha, base fingerprint, created,
parents, metrics and the manifest itself as JSON). The files under ``tasks/`` stay the source of
truth: the index is rewritten per task from them, and is thrown away and rebuilt if it is missing,
corrupt or of another schema.

Staleness is detected cheaply by :meth:`Index.stale`: per task, the ``status.json`` generation and
the set of ``v<N>`` directories the rows were built from, against a fresh directory scan. A commit
killed between its rename and its index update shows up there; :meth:`Index.rebuild` repairs it.

Every call opens its own short-lived connection: connections are then never shared between
threads or forked processes, and SQLite's own locking (with a busy timeout) serialises readers
against the single writer (which also holds the registry lock).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cladapt.errors import IntegrityError, RegistryError
from cladapt.registry.fsio import is_tmp_name
from cladapt.registry.manifest import (
    Manifest,
    Problem,
    TaskStatus,
    VersionRecord,
    load_manifest,
    load_task_status,
    make_record,
    save_task_status,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"
INDEX_SCHEMA = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (task TEXT PRIMARY KEY, generation INTEGER NOT NULL, dirs TEXT NOT NULL);
CREATE TABLE versions (
    task TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL, method TEXT NOT NULL,
    composition TEXT NOT NULL, r INTEGER NOT NULL, alpha REAL NOT NULL, base_fingerprint TEXT NOT NULL,
    created TEXT NOT NULL, parents TEXT NOT NULL, metrics TEXT NOT NULL, manifest TEXT NOT NULL,
    PRIMARY KEY (task, version)
);
CREATE INDEX versions_status ON versions (task, status);
CREATE INDEX versions_base ON versions (base_fingerprint);
CREATE TABLE parents (
    child_task TEXT NOT NULL, child_version INTEGER NOT NULL, parent_task TEXT NOT NULL, parent_version INTEGER NOT NULL,
    PRIMARY KEY (child_task, child_version, parent_task, parent_version)
);
CREATE INDEX parents_parent ON parents (parent_task, parent_version);
"""
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")
_TASK_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: Called for every repair: (action, ref, from, to, reason) -> appends an audit event.
EventSink = Callable[[str, "str | None", Any, Any, str], None]
_COLUMNS = "task, version, status, method, composition, r, alpha, base_fingerprint, created, parents, manifest"


class Index:
    """Typed access to the SQLite index. Writes must happen under the registry lock."""

    def __init__(self, path: Path, tasks_dir: Path) -> None:
        self.path = Path(path)
        self.tasks_dir = Path(tasks_dir)

    @contextmanager
    def _connect(self, *, write: bool = False, create: bool = False) -> Iterator[sqlite3.Connection]:
        # mode=rw: a deleted index raises instead of silently becoming a new empty database.
        mode = "rwc" if create else "rw"
        conn = sqlite3.connect(f"{self.path.as_uri()}?mode={mode}", uri=True, timeout=60.0, isolation_level=None)
        try:
            if write:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            else:
                yield conn
        finally:
            conn.close()

    # ---------------------------------------------------------------- schema

    def usable(self) -> bool:
        """True when the index file exists, is a SQLite database and has this schema version.

        Opened read-only, so checking never creates or alters the file.
        """
        if not self.path.is_file():
            return False
        try:
            conn = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=60.0)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            logger.warning("%s: unreadable index (%s); it will be rebuilt from the manifests", self.path, exc)
            return False
        if row is None or row[0] != str(INDEX_SCHEMA):
            logger.warning("%s: index schema %s is not %s; it will be rebuilt", self.path, row, INDEX_SCHEMA)
            return False
        return True

    def rebuild_all(self, on_event: EventSink) -> list[Problem]:
        """Build a complete new index from every task on disk in a temporary file, then swap it in.

        Readers never take the registry lock, so the index must never be visible half-built:
        ``os.replace`` switches them from the old file to the finished one in one step. The
        caller holds the lock.
        """
        for orphan in self.path.parent.glob(f".{self.path.name}.*.tmp*"):  # from a rebuild that was killed
            orphan.unlink(missing_ok=True)
        fresh = Index(self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp"), self.tasks_dir)
        try:
            fresh.reset()
            previous = self if self.usable() else None
            problems = fresh.rebuild(disk_tasks(self.tasks_dir), on_event, previous=previous)
            os.replace(fresh.path, self.path)
        finally:
            fresh.path.unlink(missing_ok=True)
            Path(f"{fresh.path}-journal").unlink(missing_ok=True)
        return problems

    def reset(self) -> None:
        """Delete and recreate an empty index. Only for a file no reader can see yet (a new
        registry, or the temporary file of :meth:`rebuild_all`)."""
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        with self._connect(write=True, create=True) as conn:
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(INDEX_SCHEMA),))

    # ---------------------------------------------------------------- writes

    def replace_tasks(self, tasks: dict[str, tuple[int, frozenset[int], list[VersionRecord]]]) -> None:
        """Replace every row of each given task in one transaction.

        ``tasks`` maps task -> (status.json generation, version dirs on disk, records). ``dirs``
        may include versions whose manifest is unreadable (they get no row but must not make the
        index look stale forever). A generation below 0 drops the task (gone from disk).
        """
        with self._connect(write=True) as conn:
            for task, (generation, dirs, records) in tasks.items():
                conn.execute("DELETE FROM versions WHERE task=?", (task,))
                conn.execute("DELETE FROM parents WHERE child_task=?", (task,))
                if generation < 0:
                    conn.execute("DELETE FROM tasks WHERE task=?", (task,))
                    continue
                self._set_task(conn, task, generation, dirs)
                for rec in records:
                    self._insert(conn, rec)

    def update_task(
        self,
        task: str,
        generation: int,
        dirs: frozenset[int],
        *,
        upsert: Iterable[VersionRecord] = (),
        statuses: dict[int, str] | None = None,
        delete: Iterable[int] = (),
    ) -> None:
        """Apply one commit / status change / removal to a task's rows in one transaction."""
        with self._connect(write=True) as conn:
            self._set_task(conn, task, generation, dirs)
            for version in delete:
                conn.execute("DELETE FROM versions WHERE task=? AND version=?", (task, version))
                conn.execute("DELETE FROM parents WHERE child_task=? AND child_version=?", (task, version))
            for rec in upsert:
                self._insert(conn, rec)
            for version, status in (statuses or {}).items():
                conn.execute("UPDATE versions SET status=? WHERE task=? AND version=?", (status, task, version))

    @staticmethod
    def _set_task(conn: sqlite3.Connection, task: str, generation: int, dirs: frozenset[int]) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO tasks (task, generation, dirs) VALUES (?, ?, ?)",
            (task, generation, json.dumps(sorted(dirs))),
        )

    @staticmethod
    def _insert(conn: sqlite3.Connection, rec: VersionRecord) -> None:
        conn.execute("DELETE FROM parents WHERE child_task=? AND child_version=?", (rec.task, rec.version))
        conn.execute(
            "INSERT OR REPLACE INTO versions (task, version, status, method, composition, r, alpha, base_fingerprint,"
            " created, parents, metrics, manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _row(rec),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO parents VALUES (?, ?, ?, ?)",
            [(rec.task, rec.version, *_split_ref(p)) for p in rec.parents],
        )

    # ---------------------------------------------------------------- reads

    def state(self, task: str | None = None) -> dict[str, tuple[int, frozenset[int]]]:
        """task -> (status.json generation, version dirs) as of the last index update."""
        where, args = ("WHERE task=?", (task,)) if task is not None else ("", ())
        with self._connect() as conn:
            rows = conn.execute(f"SELECT task, generation, dirs FROM tasks {where}", args).fetchall()
        return {str(t): (int(g), frozenset(int(v) for v in json.loads(d))) for t, g, d in rows}

    def records(
        self,
        task: str | None = None,
        *,
        version: int | None = None,
        statuses: Iterable[str] | None = None,
        newest: bool = False,
    ) -> list[VersionRecord]:
        """Rows as records, ordered by task then version, filtered by task, version and status.

        ``newest`` returns only the highest version matching (without parsing the others).
        """
        clauses: list[str] = []
        args: list[object] = []
        if task is not None:
            clauses.append("task=?")
            args.append(task)
        if version is not None:
            clauses.append("version=?")
            args.append(version)
        if statuses is not None:
            wanted = list(statuses)
            clauses.append(f"status IN ({', '.join('?' * len(wanted))})")
            args += wanted
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as conn:
            order = "ORDER BY version DESC LIMIT 1" if newest else "ORDER BY task, version"
            rows = conn.execute(f"SELECT {_COLUMNS} FROM versions {where} {order}", args).fetchall()
        return [self._record(row) for row in rows]

    def tasks(self) -> list[str]:
        """Tasks that have at least one version."""
        with self._connect() as conn:
            return [row[0] for row in conn.execute("SELECT DISTINCT task FROM versions ORDER BY task")]

    def dependants(self, task: str, version: int) -> list[str]:
        """Refs of versions that list ``task@version`` among their parents."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT child_task, child_version FROM parents WHERE parent_task=? AND parent_version=?"
                " ORDER BY child_task, child_version",
                (task, version),
            ).fetchall()
        return [f"{t}@{v}" for t, v in rows]

    def _record(self, row: tuple[object, ...]) -> VersionRecord:
        task, version, status, method, composition, r, alpha, base_fp, created, parents, manifest = row
        return VersionRecord(
            task=str(task),
            version=int(version),  # type: ignore[call-overload]
            status=str(status),
            method=str(method),
            composition=str(composition),
            r=int(r),  # type: ignore[call-overload]
            alpha=float(alpha),  # type: ignore[arg-type]
            base_fingerprint=str(base_fp),
            created=str(created),
            parents=tuple(json.loads(str(parents))),
            path=Path(f"{self.tasks_dir}/{task}/v{version}"),  # one parse, not two joins: list() is hot
            manifest=Manifest.model_validate_json(str(manifest)),
        )


    # ---------------------------------------------------------------- rebuilding from disk

    def stale(self, task: str | None = None) -> set[str]:
        """Tasks whose rows no longer match the disk (version dirs or status generation differ)."""
        disk, indexed = disk_state(self.tasks_dir, task), self.state(task)
        return {t for t in disk.keys() | indexed.keys() if disk.get(t) != indexed.get(t)}

    def rebuild(self, tasks: Iterable[str], on_event: EventSink, *, previous: Index | None = None) -> list[Problem]:
        """Rebuild the rows of ``tasks`` from their manifests, repairing ``status.json`` on the way.

        The caller must hold the registry lock. Repairs, each reported to ``on_event``:
        a version directory without a status (a commit killed after its rename) becomes
        ``candidate``, never silently ``active``; a status without a directory (a remove killed
        after its rename) is dropped; an unreadable ``status.json`` is rebuilt from the index.
        Versions whose manifest is unreadable get no row and are returned as problems.
        ``previous`` is the index whose statuses rebuild an unreadable ``status.json`` (default: self).
        """
        problems: list[Problem] = []
        batch: dict[str, tuple[int, frozenset[int], list[VersionRecord]]] = {}
        for task in sorted(set(tasks)):
            task_dir = self.tasks_dir / task
            if not task_dir.is_dir():
                batch[task] = (-1, frozenset(), [])
                continue
            for leftover in task_dir.iterdir():  # temporaries of a writer killed mid-write
                if is_tmp_name(leftover.name):
                    leftover.unlink(missing_ok=True)
            status, changed = self._load_or_rebuild_status(task, problems, on_event, previous or self)
            dirs = version_dirs(task_dir)
            records = []
            for version in sorted(dirs):
                manifest = load_checked_manifest(task_dir, version, problems)
                if version not in status.versions:
                    status.versions[version] = "candidate"
                    changed = True
                    on_event("recover", f"{task}@{version}", None, "candidate", "version found without a status")
                if manifest is not None:
                    records.append(make_record(manifest, status.versions[version], task_dir / f"v{version}"))
            for version in sorted(set(status.versions) - dirs):
                on_event("recover", f"{task}@{version}", status.versions.pop(version), None, "status without a version")
                changed = True
            status.last_version = max([status.last_version, *dirs])
            if changed:
                status.generation += 1
                save_task_status(task_dir / "status.json", status)
            batch[task] = (status.generation, dirs, records)
        self.replace_tasks(batch)
        return problems

    def _load_or_rebuild_status(
        self, task: str, problems: list[Problem], on_event: EventSink, previous: Index | None
    ) -> tuple[TaskStatus, bool]:
        try:
            return load_task_status(self.tasks_dir / task / "status.json"), False
        except IntegrityError as exc:
            problems.append(Problem(f"{task}/status.json", exc.message))
            known = {rec.version: rec.status for rec in previous.records(task)} if previous else {}
            generation = previous.state(task).get(task, (0, frozenset()))[0] + 1 if previous else 1
            on_event("recover", task, None, None, "status.json was unreadable; rebuilt from the index")
            return TaskStatus(generation=max(generation, 1), versions=known), True

    def compare(self) -> list[Problem]:
        """Differences between the index and the manifests + statuses on disk (nothing is changed)."""
        problems: list[Problem] = []
        indexed = {(rec.task, rec.version): rec for rec in self.records()}
        seen: set[tuple[str, int]] = set()
        for entry in sorted(os.scandir(self.tasks_dir), key=lambda e: e.name):
            if not _TASK_DIR.fullmatch(entry.name) or not entry.is_dir():
                problems.append(Problem(f"tasks/{entry.name}", "not a valid task folder"))
                continue
            statuses = load_task_status(Path(entry.path) / "status.json").versions
            if sum(s == "active" for s in statuses.values()) > 1:
                problems.append(Problem(entry.name, "more than one active version"))
            for version in sorted(version_dirs(Path(entry.path))):
                seen.add((entry.name, version))
                manifest = load_checked_manifest(Path(entry.path), version, problems)
                if manifest is None:
                    continue
                expected = make_record(manifest, statuses.get(version, "?"), Path(entry.path) / f"v{version}")
                rec = indexed.get((entry.name, version))
                if rec is None:
                    problems.append(Problem(str(expected.ref), "missing from the index (run verify --reindex)"))
                elif rec != expected or rec.manifest != manifest:
                    problems.append(Problem(str(expected.ref), "index row differs from the manifest (run verify --reindex)"))
        problems += [Problem(f"{t}@{v}", "indexed but its folder is missing") for (t, v) in sorted(indexed.keys() - seen)]
        return problems


# ------------------------------------------------------------------------------------------------
# The disk side of the comparison.


def version_dirs(task_dir: Path) -> frozenset[int]:
    """Version numbers of the ``v<N>`` folders of a task (symlinks are not versions)."""
    try:
        entries = list(os.scandir(task_dir))
    except FileNotFoundError:
        return frozenset()
    return frozenset(
        int(m.group(1)) for e in entries if (m := _VERSION_DIR.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)
    )


def disk_tasks(tasks_dir: Path) -> list[str]:
    """Task folders under ``tasks/`` (with valid names)."""
    try:
        return sorted(e.name for e in os.scandir(tasks_dir) if _TASK_DIR.fullmatch(e.name) and e.is_dir())
    except FileNotFoundError:
        return []


def disk_state(tasks_dir: Path, task: str | None = None) -> dict[str, tuple[int, frozenset[int]]]:
    """task -> (status.json generation, version dirs), read from disk; -2 marks an unreadable status."""
    state: dict[str, tuple[int, frozenset[int]]] = {}
    for name in [task] if task is not None else disk_tasks(tasks_dir):
        task_dir = tasks_dir / name
        if not task_dir.is_dir():
            continue
        try:
            generation = load_task_status(task_dir / "status.json").generation
        except IntegrityError:
            generation = -2  # never equal to the index: forces a repair
        state[name] = (generation, version_dirs(task_dir))
    return state


def load_checked_manifest(task_dir: Path, version: int, problems: list[Problem]) -> Manifest | None:
    """The manifest of ``task_dir/v<version>``, or None (with a problem) if unreadable or misplaced."""
    where = f"{task_dir.name}@{version}"
    try:
        manifest = load_manifest(task_dir / f"v{version}" / "manifest.json")
    except RegistryError as exc:
        problems.append(Problem(where, exc.message))
        return None
    if (manifest.task, manifest.version) != (task_dir.name, version):
        problems.append(Problem(where, f"manifest says {manifest.task}@{manifest.version}"))
        return None
    return manifest


def _row(rec: VersionRecord) -> tuple[object, ...]:
    return (
        rec.task,
        rec.version,
        rec.status,
        rec.method,
        rec.composition,
        rec.r,
        rec.alpha,
        rec.base_fingerprint,
        rec.created,
        json.dumps(list(rec.parents)),
        json.dumps(rec.manifest.metrics, default=str),
        rec.manifest.model_dump_json(),
    )


def _split_ref(text: str) -> tuple[str, int]:
    task, _, version = text.partition("@")
    return task, int(version)
