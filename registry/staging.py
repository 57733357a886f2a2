"""The staging area: where a training run writes its version before it exists in the registry.

A run gets a private directory ``<root>/.work/staging/<uuid>/`` laid out exactly like a version
(``adapter/``, ``sidecars/``). It writes there for as long as it likes, holding no lock; nothing in
``.work`` is registry state, so a run that crashes or is killed leaves the registry untouched.
:meth:`Store.commit` then hashes every staged file, writes ``manifest.json`` and renames the whole
directory into ``tasks/<task>/v<N>`` in one atomic step.

This module also holds the checks a staged tree must pass (safe names, no symlinks, no pickle
formats) and the small content-addressed layout used for shared state (``Store.write_shared``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cladapt.errors import IntegrityError, RegistryError
from cladapt.registry.fsio import (
    CRASH_ENV,
    atomic_write_bytes,
    crash_point,
    dumps_json,
    fsync_dir,
    fsync_tree,
    iter_files,
    read_nofollow,
    sha256_file,
)
from cladapt.registry.lock import Claim, claim_path
from cladapt.registry.manifest import (
    FORBIDDEN_SUFFIXES,
    FileEntry,
    Manifest,
    format_validation_error,
)
from cladapt.registry.refs import validate_filename, validate_relpath, validate_task_name

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

#: Names the store writes itself; a staged tree may not contain them.
RESERVED = ("manifest.json", "evals")
SHARED_MANIFEST = "manifest.json"
__all__ = ["CRASH_ENV", "RESERVED", "Staging", "build_manifest", "collect_files", "crash_point", "publish_version"]


class Staging:
    """A private, lock-free directory in which one run assembles one version.

    Attributes:
        task: the task the version will belong to.
        dir: the staging directory; it becomes ``tasks/<task>/v<N>`` at commit.
        adapter_dir: ``dir/"adapter"``, where the trainer's PEFT ``save_pretrained`` output goes.
        sidecar_dir: ``dir/"sidecars"``, for continual-learning state (safetensors / JSON).
        manifest_fields: every :class:`Manifest` field except ``task``, ``version``, ``files`` and
            ``created``, filled in by the caller before commit.

    Used as a context manager, the directory is discarded on an exception or when the block ends
    without a commit.
    """

    def __init__(self, task: str, directory: Path) -> None:
        self.task = validate_task_name(task)
        self.dir = Path(directory)
        self.adapter_dir = self.dir / "adapter"
        self.sidecar_dir = self.dir / "sidecars"
        self.manifest_fields: dict[str, Any] = {}
        self.committed = False
        self.discarded = False
        self.claim: Claim | None = None

    @classmethod
    def create(cls, task: str, directory: Path) -> Staging:
        """Create the directory tree (it must not exist yet) and return the staging.

        The folder is claimed (``<dir>.lock``, see :class:`~cladapt.registry.lock.Claim`) until it
        is committed or discarded, so ``registry gc`` never removes a live run's staging.
        """
        staging = cls(task, directory)
        staging.dir.parent.mkdir(parents=True, exist_ok=True)
        staging.claim = Claim.take(claim_path(staging.dir))
        if staging.claim is None:
            raise RegistryError(f"staging folder {directory} is already claimed by another process")
        try:
            staging.dir.mkdir()
            staging.adapter_dir.mkdir()
            staging.sidecar_dir.mkdir()
        except BaseException:
            staging.claim.release(remove=True)
            raise
        logger.debug("staging %s for task %s", staging.dir, task)
        return staging

    @property
    def is_open(self) -> bool:
        """True until the staging is committed or discarded."""
        return not (self.committed or self.discarded)

    def path(self, relpath: str) -> Path:
        """Where ``relpath`` lives: a bare file name means ``sidecars/<name>``.

        Paths with a '/' are relative to the version directory (``adapter/extra.json``).
        """
        self._require_open()
        relpath = validate_relpath(relpath, what="staged path")
        if "/" not in relpath:
            relpath = f"sidecars/{relpath}"
        if relpath.split("/")[0] in RESERVED:
            raise RegistryError(f"{relpath!r} is reserved for the registry", hint="write sidecars under 'sidecars/'")
        return self.dir / relpath

    def write_json(self, relpath: str, obj: Any) -> None:
        """Write ``obj`` as JSON at ``relpath`` (a bare name goes to ``sidecars/``)."""
        target = self.path(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = dumps_json(obj)
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"cannot write {relpath!r} as JSON: {exc}", hint="pass plain dicts, lists, str and numbers") from exc
        atomic_write_bytes(target, data)

    def write_tensors(self, relpath: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
        """Write tensors as safetensors at ``relpath`` (a bare name goes to ``sidecars/``)."""
        from safetensors.torch import save

        if not relpath.endswith(".safetensors"):
            raise RegistryError(f"tensor file {relpath!r} must end in '.safetensors'")
        target = self.path(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        # safetensors refuses non-contiguous or shared storage; detach/cpu/contiguous covers
        # what methods typically hand over (views of parameters, CUDA tensors).
        plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        atomic_write_bytes(target, save(plain, metadata=metadata))

    def discard(self) -> None:
        """Delete the staging directory. Safe to call twice; a no-op after commit."""
        if self.committed or self.discarded:
            return
        self.discarded = True
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.claim is not None:
            self.claim.release(remove=True)
        logger.debug("discarded staging %s", self.dir)

    def _require_open(self) -> None:
        if not self.is_open:
            state = "committed" if self.committed else "discarded"
            raise RegistryError(f"staging {self.dir.name} for task {self.task!r} is already {state}", hint="call Store.stage() again")

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.committed:
            self.discard()

    def __repr__(self) -> str:
        return f"Staging(task={self.task!r}, dir={str(self.dir)!r}, committed={self.committed})"


def publish_version(staging: Staging, task_dir: Path, version: int) -> None:
    """Rename a staging directory to ``task_dir/v<version>``: the commit point. Caller holds the lock.

    For a new task, ``tasks/<task>/v<N>`` is assembled inside ``.work`` and the task folder is
    renamed into place, so a crash before that single rename leaves not even an empty folder.
    """
    target = task_dir / f"v{version}"
    if task_dir.is_dir():
        crash_point("before_rename")
        os.rename(staging.dir, target)
    else:
        wrapper = staging.dir.with_name(staging.dir.name + "-task")
        wrapper.mkdir()
        os.rename(staging.dir, wrapper / target.name)
        fsync_dir(wrapper)
        crash_point("before_rename")
        os.rename(wrapper, task_dir)
        fsync_dir(task_dir.parent)
    fsync_dir(task_dir)
    fsync_dir(staging.dir.parent)
    staging.committed = True
    if staging.claim is not None:
        staging.claim.release(remove=True)


def collect_files(directory: Path) -> list[FileEntry]:
    """Check and hash every file of a staged tree, then fsync it.

    All problems are collected and raised together: unsafe names, symlinks or special files,
    pickle-based formats (``.bin``, ``.pt`` ...), and the registry's reserved names.
    """
    problems: list[str] = []
    entries: list[FileEntry] = []
    for rel in iter_files(directory):
        relpath = rel.as_posix()
        path = directory / rel
        try:
            validate_relpath(relpath, what="staged file")
        except RegistryError as exc:
            problems.append(exc.message)
            continue
        if path.is_symlink() or not path.is_file():
            problems.append(f"{relpath}: symlinks and special files are not allowed")
        elif path.suffix.lower() in FORBIDDEN_SUFFIXES:
            problems.append(f"{relpath}: {path.suffix} files can contain pickles; use safetensors or JSON")
        elif relpath.split("/")[0] in RESERVED:
            problems.append(f"{relpath}: this name is reserved for the registry")
        else:
            digest, size = sha256_file(path)
            entries.append(FileEntry(path=relpath, sha256=digest, size=size))
    if problems:
        raise RegistryError(
            f"the staged version in {directory} cannot be committed:\n  - " + "\n  - ".join(problems),
            hint="save adapters with safe_serialization=True and write sidecars through Staging.write_tensors/write_json",
        )
    if not any(e.path.startswith("adapter/") for e in entries):
        logger.warning("staged version in %s has no adapter files; it cannot be served", directory)
    fsync_tree(directory)
    return entries


def build_manifest(fields: dict[str, Any], **fixed: Any) -> Manifest:
    """Validate the caller's manifest fields plus the store's own (task, version, files, created).

    Raises:
        RegistryError: listing every missing or invalid field at once.
    """
    clash = sorted(set(fields) & set(fixed))
    if clash:
        raise RegistryError(f"manifest_fields must not set {clash}", hint="the store fills task, version, files and created")
    try:
        manifest = Manifest.model_validate({**fields, **fixed})
        manifest.model_dump_json()  # fails now, not under the lock, on values JSON cannot hold
    except ValidationError as exc:
        lines = format_validation_error(exc, prefix="manifest_fields.")
        raise RegistryError(
            "invalid manifest fields:\n  - " + "\n  - ".join(lines),
            hint="fill Staging.manifest_fields with every Manifest field except task, version, files and created",
        ) from exc
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"manifest fields are not JSON-serialisable: {exc}") from exc
    return manifest


# --------------------------------------------------------------------------------------------
# Shared state: a directory of files plus manifest.json {"files": {name: {"sha256", "size"}}}.


def stage_shared(directory: Path, files: dict[str, Path]) -> None:
    """Copy ``files`` (name -> source path) into a new ``directory`` with a sha256 manifest."""
    directory.mkdir(parents=True)
    listing: dict[str, dict[str, Any]] = {}
    for name, source in sorted(files.items()):
        validate_filename(name, what="shared file name")
        if name == SHARED_MANIFEST or Path(name).suffix.lower() in FORBIDDEN_SUFFIXES:
            raise RegistryError(f"shared file name {name!r} is not allowed", hint="use safetensors or JSON files")
        shutil.copyfile(source, directory / name)
        digest, size = sha256_file(directory / name)
        listing[name] = {"sha256": digest, "size": size}
    atomic_write_bytes(directory / SHARED_MANIFEST, dumps_json({"format": 1, "files": listing}))
    fsync_tree(directory)


def _backup_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.replaced")


def publish_shared(staged: Path, target: Path) -> bool:
    """Move a staged shared-state folder to ``target``; returns True if it replaced an old one.

    Directories cannot be swapped atomically with ``os.rename``, so the old folder is first
    renamed to ``.<key>.replaced``. A writer killed between the two renames leaves the old state
    intact there: :func:`read_shared_dir` falls back to it, and the next writer restores it first.
    The caller holds the registry lock.
    """
    backup = _backup_of(target)
    if backup.is_dir():  # finish an interrupted replace
        if target.is_dir():
            shutil.rmtree(backup)
        else:
            os.rename(backup, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    replaced = target.is_dir()
    if replaced:
        os.rename(target, backup)
    os.rename(staged, target)
    fsync_dir(target.parent)
    shutil.rmtree(backup, ignore_errors=True)
    return replaced


def read_shared_dir(target: Path, label: str) -> Path | None:
    """The verified folder ``target`` (or its backup, mid-replace), or None if never written."""
    if not target.is_dir():
        target = _backup_of(target)
        if not target.is_dir():
            return None
    verify_shared(target, label)
    return target


def verify_shared(directory: Path, label: str) -> None:
    """Check a shared-state folder against its manifest; IntegrityError names the bad file."""
    hint = f"delete {directory} and recompute it"
    try:
        raw = json.loads(read_nofollow(directory / SHARED_MANIFEST))
        if set(raw) != {"format", "files"} or raw["format"] != 1:
            raise ValueError(f"expected the keys format (1) and files, got {sorted(raw)} (format {raw.get('format')!r})")
        listing = raw["files"]
        expected = {validate_filename(n): (str(m["sha256"]), int(m["size"])) for n, m in listing.items()}
        if any(set(m) != {"sha256", "size"} for m in listing.values()):
            raise ValueError("every file needs exactly sha256 and size")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RegistryError) as exc:
        raise IntegrityError(f"shared state {label}: unreadable {SHARED_MANIFEST} ({exc})", hint=hint) from exc
    extra = sorted({p.as_posix() for p in iter_files(directory)} - {SHARED_MANIFEST} - set(expected))
    if extra:
        raise IntegrityError(f"shared state {label}: file {extra[0]!r} is not listed in its manifest", hint=hint)
    for name, (digest, size) in sorted(expected.items()):
        path = directory / name
        if path.is_symlink() or not path.is_file():
            raise IntegrityError(f"shared state {label}: file {name!r} is missing", hint=hint)
        if sha256_file(path) != (digest, size):
            raise IntegrityError(f"shared state {label}: file {name!r} does not match its sha256", hint=hint)
