"""The disk side of the index: what ``tasks/`` holds right now (task folders, ``v<N>`` folders,
``status.json`` generations, checked manifests), read without the index so the two can be compared.
Links are never followed: a linked task or version folder is not one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cladapt.errors import IntegrityError, RegistryError
from cladapt.registry.manifest import Manifest, Problem, read_manifest
from cladapt.registry.status import load_task_status

_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")
TASK_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def version_dirs(task_dir: Path) -> frozenset[int]:
    """Version numbers of the ``v<N>`` folders of a task (symlinks are not versions)."""
    try:
        entries = list(os.scandir(task_dir))
    except (FileNotFoundError, NotADirectoryError):
        return frozenset()
    return frozenset(
        int(m.group(1)) for e in entries if (m := _VERSION_DIR.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)
    )


def disk_tasks(tasks_dir: Path) -> list[str]:
    """Task folders under ``tasks/`` (valid names, real folders: a link is never adopted as a task)."""
    try:
        return sorted(e.name for e in os.scandir(tasks_dir) if TASK_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def disk_state(tasks_dir: Path, task: str | None = None) -> dict[str, tuple[int, frozenset[int]]]:
    """task -> (status.json generation, version dirs), read from disk.

    -2 marks an unreadable status and -3 one that still owes audit events: neither ever equals the
    index, which forces a repair under the lock.
    """
    state: dict[str, tuple[int, frozenset[int]]] = {}
    for name in [task] if task is not None else disk_tasks(tasks_dir):
        task_dir = tasks_dir / name
        if task_dir.is_symlink() or not task_dir.is_dir():
            continue
        try:
            status = load_task_status(task_dir / "status.json")
            generation = -3 if status.owed_audit else status.generation
        except IntegrityError:
            generation = -2
        state[name] = (generation, version_dirs(task_dir))
    return state


def load_checked_manifest(
    task_dir: Path, version: int, problems: list[Problem], expected_sha256: str | None = None
) -> tuple[Manifest, str] | None:
    """The manifest of ``task_dir/v<version>`` and its sha256, or None (with a problem) if it is
    unreadable, newer than this cladapt, misplaced, or differs from ``expected_sha256``."""
    where = f"{task_dir.name}@{version}"
    try:
        manifest, digest = read_manifest(task_dir / f"v{version}" / "manifest.json")
    except RegistryError as exc:
        problems.append(Problem(where, exc.message))
        return None
    if expected_sha256 is not None and digest != expected_sha256:
        problems.append(Problem(where, "manifest.json does not match the sha256 recorded in status.json (damaged or edited)"))
        return None
    if (manifest.task, manifest.version) != (task_dir.name, version):
        problems.append(Problem(where, f"manifest says {manifest.task}@{manifest.version}"))
        return None
    return manifest, digest
