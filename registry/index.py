"""The SQLite index, ``<root>/index.sqlite``: a derived, rebuildable cache of manifests + statuses.

Listing 10,000 versions by opening 10,000 manifests would be slow, so every committed version is
also a row here (task, version, status, method, composition, r, alpha, base fingerprint, created,
parents, metrics and the manifest itself as JSON). The files under ``tasks/`` stay the source of
truth: the index is rewritten per task from them, and is thrown away and rebuilt if it is missing,
corrupt or of another schema.

Staleness is detected cheaply by :meth:`Index.state`: per task, the ``status.json`` generation the
rows were built from and the set of version numbers. The store compares that with a directory scan.

Every call opens its own short-lived connection: connections are then never shared between
threads or forked processes, and SQLite's own locking (with a busy timeout) serialises readers
against the single writer (which also holds the registry lock).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cladapt.registry.manifest import Manifest, VersionRecord

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
_COLUMNS = "task, version, status, method, composition, r, alpha, base_fingerprint, created, parents, manifest"


class Index:
    """Typed access to the SQLite index. Writes must happen under the registry lock."""

    def __init__(self, path: Path, tasks_dir: Path) -> None:
        self.path = Path(path)
        self.tasks_dir = Path(tasks_dir)

    @contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
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

    def ensure(self) -> bool:
        """Open (creating if needed) the index. Returns True when it was (re)created empty.

        A corrupt file or a different schema is deleted and recreated: the index holds nothing
        that the manifests do not.
        """
        try:
            with self._connect() as conn:
                tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "meta" in tables:
                    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                    if row is not None and row[0] == str(INDEX_SCHEMA):
                        return False
                    logger.warning("%s: index schema %s differs from %s; rebuilding", self.path, row, INDEX_SCHEMA)
                elif tables:
                    logger.warning("%s: not a cladapt index; rebuilding", self.path)
        except sqlite3.DatabaseError as exc:
            logger.warning("%s: unreadable index (%s); rebuilding it from the manifests", self.path, exc)
        self.reset()
        return True

    def reset(self) -> None:
        """Delete and recreate an empty index (the caller then reindexes every task)."""
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        with self._connect(write=True) as conn:
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
            path=self.tasks_dir / str(task) / f"v{version}",
            manifest=Manifest.model_validate_json(str(manifest)),
        )


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
