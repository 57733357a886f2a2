"""The SQLite index, ``<root>/index.sqlite``: a derived, disposable cache of manifests + statuses.

Listing 10,000 versions by opening 10,000 manifests would be slow, so every committed version is
also a row here (task, version, status, method, composition, r, alpha, base fingerprint, created,
parents, metrics and the manifest itself as JSON). The files under ``tasks/`` stay the source of
truth: the index is rewritten per task from them, and is thrown away and rebuilt whenever it is
missing, a link, of another schema, damaged, or has a rollback journal next to it.

**Never trusted.** Every row carries a checksum over its columns, checked on every read, and the
rows of a task must be exactly the versions its ``tasks`` row says were indexed; a read that finds
otherwise raises :class:`IndexCorrupt` (a ``sqlite3.DatabaseError``), and the store rebuilds the
index from the manifests. Every index writer holds the registry lock, so a ``-journal`` file seen
by a lock holder is always the leftover of a killed writer: SQLite would roll it back into whatever
file now has the index's name, so such an index is rebuilt and the journal deleted, never replayed.
Readers open the file read-only (``mode=ro``), so they can never replay a journal themselves.

Staleness is detected cheaply by :meth:`Index.stale`: per task, the ``status.json`` generation and
the set of ``v<N>`` directories the rows were built from, against a fresh directory scan. A commit
killed between its rename and its index update shows up there; :meth:`Index.rebuild` repairs it.

Every call opens its own short-lived connection: connections are then never shared between
threads or forked processes, and SQLite's own locking (with a busy timeout) serialises readers
against the single writer.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cladapt.registry.disk import disk_state, disk_tasks, load_checked_manifest, version_dirs
from cladapt.registry.fsio import crash_point, fsync_dir, sha256_bytes
from cladapt.registry.index_rebuild import EventSink, IndexRebuilding, OwedSink
from cladapt.registry.manifest import Manifest, Problem, VersionRecord

__all__ = ["INDEX_FILE", "Index", "IndexCorrupt", "disk_state", "disk_tasks", "load_checked_manifest", "version_dirs"]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"
INDEX_SCHEMA = 2
#: Files SQLite keeps next to a database; any of them next to the index makes it untrusted.
SIDECARS = ("-journal", "-wal", "-shm")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (task TEXT PRIMARY KEY, generation INTEGER NOT NULL, dirs TEXT NOT NULL, skipped TEXT NOT NULL);
CREATE TABLE versions (
    task TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL, method TEXT NOT NULL,
    composition TEXT NOT NULL, r INTEGER NOT NULL, alpha REAL NOT NULL, base_fingerprint TEXT NOT NULL,
    created TEXT NOT NULL, parents TEXT NOT NULL, metrics TEXT NOT NULL, manifest TEXT NOT NULL,
    checksum TEXT NOT NULL,
    PRIMARY KEY (task, version)
);
"""

_COLUMNS = "task, version, status, method, composition, r, alpha, base_fingerprint, created, parents, manifest"


class IndexCorrupt(sqlite3.DatabaseError):
    """The index contradicts itself (a row's checksum, or rows vs. the versions indexed)."""


class Index(IndexRebuilding):
    """Typed access to the SQLite index. Writes must happen under the registry lock."""

    def __init__(self, path: Path, tasks_dir: Path) -> None:
        self.path = Path(path)
        self.tasks_dir = Path(tasks_dir)

    def _sidecars(self) -> list[Path]:
        return [Path(f"{self.path}{suffix}") for suffix in SIDECARS]

    def has_sidecars(self) -> bool:
        """True when a journal (a writer's, live or killed) or WAL file sits next to the index."""
        return any(os.path.lexists(p) for p in self._sidecars())

    @contextmanager
    def _connect(self, *, write: bool = False, create: bool = False) -> Iterator[sqlite3.Connection]:
        # Readers: mode=ro, so no reader ever replays a journal into the file. Writers (lock
        # holders): mode=rw, and a journal or a link found now is a killed writer's leftover.
        if write:
            self._check_writable()
        mode = "rwc" if create else "rw" if write else "ro"
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

    def _check_writable(self) -> None:
        if self.path.is_symlink():
            raise IndexCorrupt(f"{self.path} is a symbolic link")
        leftovers = [p.name for p in self._sidecars() if os.path.lexists(p)]
        if leftovers:
            raise IndexCorrupt(f"{self.path.name} has leftover {leftovers} of a killed writer")

    # ---------------------------------------------------------------- schema

    def usable(self) -> bool:
        """True when the index is a regular file with this schema and nothing next to it.

        A ``-journal`` (or WAL) file makes it unusable: under the lock it can only be a killed
        writer's. Without the lock it may be a live writer's: the caller then takes the lock and
        asks again. Opened read-only, so checking never creates or alters anything.
        """
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(mode):
            logger.warning("%s is not a regular file (a link?); the index will be rebuilt", self.path)
            return False
        if self.has_sidecars():
            return False
        try:
            with self._connect() as conn:
                row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            logger.warning("%s: unreadable index (%s); it will be rebuilt from the manifests", self.path, exc)
            return False
        if row is None or row[0] != str(INDEX_SCHEMA):
            logger.warning("%s: index schema %s is not %s; it will be rebuilt", self.path, row, INDEX_SCHEMA)
            return False
        return True

    def rebuild_all(self, on_event: EventSink, on_owed: OwedSink) -> list[Problem]:
        """Build a complete new index from every task on disk in a temporary file, then swap it in.

        Readers never take the registry lock, so the index must never be visible half-built:
        ``os.replace`` switches them from the old file to the finished one in one step. Only then
        is a leftover journal deleted (before that, a read-only reader meeting it fails and waits
        for the lock; nobody replays it). The caller holds the lock.
        """
        for orphan in self.path.parent.glob(f".{self.path.name}.*.tmp*"):  # from a rebuild that was killed
            orphan.unlink(missing_ok=True)
        fresh = Index(self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp"), self.tasks_dir)
        try:
            fresh.reset()
            previous = self if self.usable() else None
            problems = fresh.rebuild(disk_tasks(self.tasks_dir), on_event, on_owed, previous=previous)
            os.replace(fresh.path, self.path)
            for sidecar in self._sidecars():
                sidecar.unlink(missing_ok=True)
            fsync_dir(self.path.parent)
        finally:
            for leftover in [fresh.path, *fresh._sidecars()]:
                leftover.unlink(missing_ok=True)
        return problems

    def reset(self) -> None:
        """Delete and recreate an empty index. Only for a file no reader can see yet (a new
        registry, or the temporary file of :meth:`rebuild_all`)."""
        for path in [self.path, *self._sidecars()]:
            path.unlink(missing_ok=True)
        with self._connect(write=True, create=True) as conn:
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(INDEX_SCHEMA),))

    # ---------------------------------------------------------------- writes

    def replace_tasks(self, tasks: dict[str, tuple[int, frozenset[int], list[VersionRecord], dict[int, str]]]) -> None:
        """Replace every row of each given task in one transaction.

        ``tasks`` maps task -> (status.json generation, version dirs on disk, records, skipped).
        ``dirs`` may include versions whose manifest is unreadable: they get no row but are listed
        in ``skipped`` (version -> why), so the index does not look stale forever and the listing
        can say what it leaves out. A generation below 0 drops the task (gone from disk).
        """
        with self._connect(write=True) as conn:
            for task, (generation, dirs, records, skipped) in tasks.items():
                conn.execute("DELETE FROM versions WHERE task=?", (task,))
                if generation < 0:
                    conn.execute("DELETE FROM tasks WHERE task=?", (task,))
                    continue
                self._set_task(conn, task, generation, dirs, skipped)
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
        crash: str | None = None,
    ) -> None:
        """Apply one commit / status change / removal to a task's rows in one transaction.

        ``crash`` names the test crash point fired inside the transaction (before COMMIT).
        """
        with self._connect(write=True) as conn:
            row = conn.execute("SELECT skipped FROM tasks WHERE task=?", (task,)).fetchone()
            skipped = {int(v): str(w) for v, w in json.loads(row[0]).items()} if row else {}
            self._set_task(conn, task, generation, dirs, {v: w for v, w in skipped.items() if v in dirs})
            for version in delete:
                conn.execute("DELETE FROM versions WHERE task=? AND version=?", (task, version))
            for rec in upsert:
                self._insert(conn, rec)
            for version, status in (statuses or {}).items():
                rows = conn.execute(f"SELECT {_COLUMNS}, checksum FROM versions WHERE task=? AND version=?",
                                    (task, version)).fetchall()
                for old in rows:  # checked first: a damaged row must never get a fresh checksum
                    self._insert(conn, self._record(old[:-1], checksum=old[-1]), status=status)
            if crash:
                crash_point(crash)

    @staticmethod
    def _set_task(conn: sqlite3.Connection, task: str, generation: int, dirs: frozenset[int], skipped: dict[int, str]) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO tasks (task, generation, dirs, skipped) VALUES (?, ?, ?, ?)",
            (task, generation, json.dumps(sorted(dirs)), json.dumps({str(v): w for v, w in sorted(skipped.items())})),
        )

    @staticmethod
    def _insert(conn: sqlite3.Connection, rec: VersionRecord, *, status: str | None = None) -> None:
        row = _row(rec, status)
        conn.execute(
            "INSERT OR REPLACE INTO versions (task, version, status, method, composition, r, alpha, base_fingerprint,"
            " created, parents, manifest, metrics, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*row, json.dumps(rec.manifest.metrics, default=str), _row_checksum(row)),
        )

    # ---------------------------------------------------------------- reads

    def state(self, task: str | None = None) -> dict[str, tuple[int, frozenset[int]]]:
        """task -> (status.json generation, version dirs) as of the last index update."""
        return {t: (g, d) for t, (g, d, _) in self._tasks(task).items()}

    def _tasks(self, task: str | None = None) -> dict[str, tuple[int, frozenset[int], dict[int, str]]]:
        where, args = ("WHERE task=?", (task,)) if task is not None else ("", ())
        with self._connect() as conn:
            rows = conn.execute(f"SELECT task, generation, dirs, skipped FROM tasks {where}", args).fetchall()
        try:
            return {
                str(t): (int(g), frozenset(int(v) for v in json.loads(d)), {int(v): str(w) for v, w in json.loads(s).items()})
                for t, g, d, s in rows
            }
        except (TypeError, ValueError, AttributeError) as exc:
            raise IndexCorrupt(f"damaged task row in {self.path.name} ({exc})") from exc

    def records(
        self,
        task: str | None = None,
        *,
        version: int | None = None,
        statuses: Iterable[str] | None = None,
        newest: bool = False,
    ) -> list[VersionRecord]:
        """Rows as records, ordered by task then version, filtered by task, version and status.

        Every row's checksum is checked, and (without ``version``) the rows of each task must be
        exactly the versions its task row says were indexed; otherwise :class:`IndexCorrupt`.
        Status filtering happens after the check, so a damaged status can never hide a row.
        ``newest`` returns only the highest version matching.
        """
        clauses, args = [], []
        for column, value in (("task", task), ("version", version)):
            if value is not None:
                clauses.append(f"{column}=?")
                args.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS}, checksum FROM versions {where} ORDER BY task, version", args).fetchall()
        records = [self._record(row[:-1], checksum=row[-1]) for row in rows]
        if version is None:
            self._check_complete(task, records)
        if statuses is not None:
            wanted = set(statuses)
            records = [r for r in records if r.status in wanted]
        return records[-1:] if newest else records

    def _check_complete(self, task: str | None, records: list[VersionRecord]) -> None:
        expected = {(t, v) for t, (_, dirs, skipped) in self._tasks(task).items() for v in dirs - skipped.keys()}
        found = {(r.task, r.version) for r in records}
        if found != expected:
            odd = sorted(found ^ expected)[:5]
            raise IndexCorrupt(f"the index rows do not match the versions it indexed ({odd})")

    def tasks(self) -> list[str]:
        """Tasks that have at least one (listed) version."""
        return sorted(t for t, (_, dirs, skipped) in self._tasks().items() if dirs - skipped.keys())

    def skipped(self, task: str | None = None) -> list[Problem]:
        """Versions on disk that have no row (unreadable or newer manifest), with the reason."""
        return [Problem(f"{t}@{v}", why) for t, (_, _, sk) in sorted(self._tasks(task).items()) for v, why in sorted(sk.items())]

    def dependants(self, task: str, version: int) -> list[str]:
        """Refs of versions that list ``task@version`` among their parents."""
        ref = f"{task}@{version}"
        return [str(rec.ref) for rec in self.records() if ref in rec.parents]

    def _record(self, row: tuple[object, ...], *, checksum: object) -> VersionRecord:
        if checksum != _row_checksum(row):
            raise IndexCorrupt(f"index row {row[0]}@{row[1]} does not match its checksum")
        task, version, status, method, composition, r, alpha, base_fp, created, parents, manifest = row
        try:
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
        except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise IndexCorrupt(f"index row {task}@{version} is unreadable ({str(exc).splitlines()[0]})") from exc


def _row(rec: VersionRecord, status: str | None = None) -> tuple[object, ...]:
    """The values of ``_COLUMNS`` for one record."""
    return (
        rec.task,
        rec.version,
        status or rec.status,
        rec.method,
        rec.composition,
        rec.r,
        rec.alpha,
        rec.base_fingerprint,
        rec.created,
        json.dumps(list(rec.parents)),
        rec.manifest.model_dump_json(),
    )


def _row_checksum(row: tuple[object, ...]) -> str:
    # Columns joined by a byte no column holds: as strong as JSON-encoding them, and several
    # times cheaper on the manifest column (which is already JSON, full of quotes to escape).
    return sha256_bytes("\x1f".join(map(str, row)).encode("utf-8", errors="surrogatepass"))
