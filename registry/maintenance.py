"""Registry maintenance: full verification (every stored byte checked, index vs manifests) and
cleaning the ``.work`` scratch. A mixin of :class:`cladapt.registry.store.Store`; both are what
``cladapt registry verify`` / ``registry gc`` run, and neither is needed on the training or
serving path.

What ``verify`` covers, file by file: every version file (sha256 in its manifest); every
``manifest.json`` (sha256 in ``status.json``); every ``status.json`` (its own checksum);
evaluations and the policy (sealed with their checksum); shared state (its own sha256 manifest);
the audit log (hash chain); the index (row checksums, compared with the manifests). Files written
by a cladapt without these checksums are counted and named in :attr:`VerifyReport.not_covered`
instead of being called verified; ``verify --reindex`` adds them for ``status.json`` files.
Symbolic links anywhere below the root are problems.
"""

from __future__ import annotations

import builtins
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import RegistryError
from cladapt.registry import audit
from cladapt.registry.fsio import find_symlinks, is_tmp_name, read_nofollow
from cladapt.registry.index import disk_tasks
from cladapt.registry.lock import Claim, claim_path
from cladapt.registry.manifest import Problem, check_evals, check_version
from cladapt.registry.staging import verify_shared
from cladapt.registry.status import unseal_json

if TYPE_CHECKING:
    from cladapt.registry.index import Index
    from cladapt.registry.lock import StoreLock

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """What :meth:`Store.verify_report` checked and found.

    Attributes:
        problems: everything wrong (empty: the registry is sound as far as it is covered).
        checked: how many items of each kind were checked (``versions``, ``files``, ...).
        not_covered: stored files that carry no checksum (written by an older cladapt).
        leftovers: scratch that killed processes left in ``.work`` (not a problem; ``registry gc``).
    """

    problems: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    not_covered: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)


class StoreMaintenance:
    """``verify``, ``leftovers`` and ``gc`` of a :class:`~cladapt.registry.store.Store`."""

    if TYPE_CHECKING:  # provided by Store
        root: Path
        tasks_dir: Path
        work_dir: Path
        _lock: StoreLock
        _index: Index
        _audit_path: Path

        def _repair(self, task: str | None = None) -> builtins.list[Problem]: ...

        def _rebuild_all(self) -> builtins.list[Problem]: ...

        def _query(self, read: Any) -> Any: ...

        def _audit(self, action: str, ref: str | None, from_: Any, to: Any, reason: str, *, actor: str,
                   **extra: Any) -> None: ...

    def verify(self, *, reindex: bool = False) -> builtins.list[Problem]:
        """Check everything (see the module docstring); ``reindex`` first rebuilds the index.

        Returns the problems that remain (an empty list means the registry is sound).
        """
        return self.verify_report(reindex=reindex).problems

    def verify_report(self, *, reindex: bool = False) -> VerifyReport:
        """:meth:`verify` with what was checked, what is not covered, and the ``.work`` leftovers."""
        report = VerifyReport()
        problems = report.problems
        problems += [Problem(link, "is a symbolic link (the registry refuses links)") for link in find_symlinks(self.root)]
        with self._lock:
            problems += self._rebuild_all() if reindex else self._repair()
            problems += self._query(self._index.compare)
            legacy_status = [t for t in disk_tasks(self.tasks_dir) if _status_format(self.tasks_dir / t) == 1]
        records = self._query(self._index.records)
        files = evals = legacy_evals = 0
        for rec in records:
            problems += check_version(rec.path, rec.manifest)
            found, legacy = check_evals(rec.path, str(rec.ref))
            problems += found
            files += len(rec.manifest.files)
            evals += len(list((rec.path / "evals").glob("*.json"))) if (rec.path / "evals").is_dir() else 0
            legacy_evals += legacy
        shared = self._verify_shared(problems)
        policy_sealed = self._verify_policy(problems)
        try:
            chain_problems, legacy_lines = audit.check_chain(self._audit_path)
            audit_lines = len(audit.read_events(self._audit_path)[0])
        except RegistryError:  # a link: reported by the symlink scan above
            chain_problems, legacy_lines, audit_lines = [], 0, 0
        problems += [Problem(audit.AUDIT_FILE, message) for message in chain_problems]
        report.checked = {
            "versions": len(records), "files": files, "manifests": len(records), "evaluations": evals,
            "shared": shared, "audit lines": audit_lines,
        }
        if legacy_status:
            report.not_covered.append(f"status.json of {', '.join(legacy_status)} (no checksum yet; `verify --reindex` adds it)")
        if legacy_evals:
            report.not_covered.append(f"{legacy_evals} evaluation file(s) written without a checksum")
        if policy_sealed is False:
            report.not_covered.append("policy.json (written without a checksum; set it again to add one)")
        if legacy_lines:
            report.not_covered.append(f"{legacy_lines} audit line(s) written before the hash chain")
        report.problems = builtins.list(dict.fromkeys(problems))  # a reindex and the comparison may both see one
        report.leftovers = self.leftovers()
        for problem in report.problems:
            logger.warning("verify: %s", problem)
        return report

    def _verify_shared(self, problems: builtins.list[Problem]) -> int:
        """Check every ``shared/<kind>/<key>`` folder against its manifest; returns how many."""
        count = 0
        shared = self.root / "shared"
        for kind in sorted(shared.iterdir()) if shared.is_dir() else []:
            if kind.is_symlink() or not kind.is_dir():
                continue  # links are reported by the symlink scan
            for folder in sorted(kind.iterdir()):
                if folder.is_symlink() or not folder.is_dir() or is_tmp_name(folder.name):
                    continue
                count += 1
                try:
                    verify_shared(folder, f"{kind.name}/{folder.name.lstrip('.')}")
                except RegistryError as exc:
                    problems.append(Problem(f"shared/{kind.name}/{folder.name}", exc.message))
        return count

    def _verify_policy(self, problems: builtins.list[Problem]) -> bool | None:
        """Check ``policy.json``: None if absent, else whether it carries a checksum."""
        path = self.root / "policy.json"
        try:
            return unseal_json(read_nofollow(path), "policy.json")[1]
        except FileNotFoundError:
            return None
        except (OSError, RegistryError) as exc:
            problems.append(Problem("policy.json", exc.message if isinstance(exc, RegistryError) else str(exc)))
            return True

    # ------------------------------------------------------------------ scratch

    def leftovers(self) -> builtins.list[str]:
        """Scratch in ``.work`` (and stray temporaries) that no live process holds, as relative paths.

        Staging folders and run checkpoints are claimed by their process while it lives (see
        :class:`~cladapt.registry.lock.Claim`); unclaimed ones were left by a killed process.
        Unclaimed run folders are listed too, but they are what ``train --resume`` continues from.
        """
        found = [p for p, _ in self._scratch(include_runs=True)]
        return sorted(str(p.relative_to(self.root)) for p in found)

    def gc(self, *, runs: bool = False, older_than_s: float = 0.0, actor: str = "cladapt") -> builtins.list[str]:
        """Remove what :meth:`leftovers` lists (run checkpoints only with ``runs``, and only what is
        older than ``older_than_s``); returns what went, as relative paths; audited.

        Holds the registry lock (so no commit is between its renames) and each folder's claim
        while deleting it, so a process starting to use one meanwhile cannot lose it.
        """
        cutoff = time.time() - older_than_s
        removed: builtins.list[str] = []
        with self._lock:
            for path, lock in self._scratch(include_runs=runs):
                if _mtime(path) > cutoff:
                    continue
                claim = Claim.take(lock) if lock is not None and lock.exists() else None
                if lock is not None and lock.exists() and claim is None:
                    continue  # claimed since we looked
                try:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
                finally:
                    if claim is not None:
                        claim.release(remove=True)
                removed.append(str(path.relative_to(self.root)))
            if removed:
                self._audit("gc", None, None, None, f"removed {len(removed)} leftover(s) from .work", actor=actor)
        return removed

    def clean_work(self, *, older_than_s: float = 0.0) -> int:
        """Remove unclaimed staging folders, the trash and stray temporaries older than
        ``older_than_s`` (claims already protect live ones); returns how many. See :meth:`gc`."""
        return len(self.gc(older_than_s=older_than_s))

    def _scratch(self, *, include_runs: bool) -> builtins.list[tuple[Path, Path | None]]:
        """(path, its claim lock or None) of everything removable in ``.work`` plus temporaries."""
        out: builtins.list[tuple[Path, Path | None]] = []
        staging, trash, runs = self.work_dir / "staging", self.work_dir / "trash", self.work_dir / "runs"
        for path in _entries(staging):
            if path.name.endswith(".lock"):
                if not _entry_exists(path.with_name(path.name[: -len(".lock")])) and _unclaimed(path):
                    out.append((path, path))
            elif _unclaimed(claim_path(path)):
                out.append((path, claim_path(path)))
        out += [(path, None) for path in _entries(trash)]
        if include_runs:
            for task in _entries(runs):
                for path in _entries(task) if task.is_dir() and not task.is_symlink() else []:
                    if not path.name.endswith(".lock") and _unclaimed(claim_path(path)):
                        out.append((path, claim_path(path)))
        for task in _entries(self.tasks_dir):
            if task.is_dir() and not task.is_symlink():
                out += [(path, None) for path in _entries(task) if is_tmp_name(path.name)]
        out += [(path, None) for path in _entries(self.root) if is_tmp_name(path.name) or ".tmp" in path.name and path.name.startswith(".index")]
        return out


def _entries(folder: Path) -> builtins.list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entry_exists(path: Path) -> bool:
    return os.path.lexists(path)


def _unclaimed(lock: Path) -> bool:
    """True when no live process holds ``lock`` (a missing lock file is unclaimed)."""
    if not lock.exists() or lock.is_symlink():
        return True
    claim = Claim.take(lock)
    if claim is None:
        return False
    claim.release()
    return True


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _status_format(task_dir: Path) -> int | None:
    import json

    try:
        raw = json.loads(read_nofollow(task_dir / "status.json"))
        return int(raw.get("format", 1)) if isinstance(raw, dict) else None
    except (OSError, ValueError, TypeError, RegistryError):
        return None
