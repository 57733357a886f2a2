"""Scratch folders for training runs (``.work/runs/<task>/...``): checkpoints for ``--resume``,
never registry state. A mixin of :class:`cladapt.registry.store.Store`.

Each run claims its own folder (:class:`~cladapt.registry.lock.Claim`), so two identical runs
started together never share or delete each other's checkpoints, and ``registry gc`` can tell a
live run's folder from a killed one's.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from cladapt.errors import RegistryError
from cladapt.registry.fsio import refuse_symlinks
from cladapt.registry.lock import Claim, claim_path
from cladapt.registry.refs import validate_shared_key, validate_task_name

logger = logging.getLogger(__name__)


class StoreRuns:
    """``run_dir`` and ``claim_run`` of a :class:`~cladapt.registry.store.Store`."""

    if TYPE_CHECKING:  # provided by Store
        root: Path
        work_dir: Path

        def _work_dir(self, name: str) -> Path: ...

    def run_dir(self, task: str, run_id: str) -> Path:
        """A scratch folder ``.work/runs/<task>/<run_id>`` for checkpoints (created; not registry state)."""
        path = refuse_symlinks(self.root, self.work_dir / "runs" / validate_task_name(task) / validate_shared_key(run_id))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def claim_run(self, task: str, key: str, *, resume: bool = False) -> RunFolder:
        """A private checkpoint folder ``.work/runs/<task>/<key>.<id>`` for one training run,
        claimed by this process until :meth:`RunFolder.release` / :meth:`RunFolder.finish`.

        Two runs with the same ``key`` (same task, data and config) started together get two
        folders, so neither deletes the other's checkpoints. ``resume`` takes over the newest
        folder of ``key`` that no live process holds (a killed run's), or starts a new one.
        Without ``resume``, unclaimed folders of ``key`` (runs nobody resumed) are deleted first;
        a live run's folder never is.
        """
        validate_shared_key(key)
        parent = self._work_dir("runs") / validate_task_name(task)
        parent.mkdir(exist_ok=True)
        mine = sorted(
            (p for p in parent.iterdir() if p.name.startswith(f"{key}.") and not p.name.endswith(".lock") and p.is_dir()),
            key=lambda p: p.stat().st_mtime, reverse=True,
        )
        for old in mine:
            claim = Claim.take(claim_path(old))
            if claim is None:
                continue  # a live run's
            if resume and old.is_dir():
                logger.info("resuming the run in %s", old)
                return RunFolder(old, claim)
            shutil.rmtree(old, ignore_errors=True)
            claim.release(remove=True)
        path = parent / f"{key}.{uuid.uuid4().hex[:12]}"
        claim = Claim.take(claim_path(path))
        if claim is None:  # pragma: no cover - a fresh uuid is never held
            raise RegistryError(f"run folder {path} is already claimed")
        path.mkdir()
        return RunFolder(path, claim)


class RunFolder:
    """A run's claimed checkpoint folder (see :meth:`Store.claim_run`); a context manager that
    releases the claim (keeping the checkpoints for ``--resume``) when the block ends."""

    def __init__(self, path: Path, claim: Claim) -> None:
        self.path = path
        self._claim = claim

    def finish(self) -> None:
        """The run is committed: delete its checkpoints and drop the claim."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._claim.release(remove=True)

    def release(self) -> None:
        """Drop the claim, keeping the checkpoints (a later ``--resume`` continues from them)."""
        self._claim.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"
