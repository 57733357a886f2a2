"""Crash-safe file primitives for the registry.

Everything the registry treats as state is written with the same recipe: write a temporary file in
the *same directory* (so the rename cannot cross filesystems), flush and fsync it, ``os.replace``
it over the target, then fsync the directory so the rename itself is durable. A reader therefore
sees either the old file or the new one, never a torn one, even after a power cut or SIGKILL.

Temporary files are named ``.<name>.<random>.tmp`` so that scans of registry folders can recognise
(and clean) leftovers of a killed writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cladapt.errors import RegistryError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
TMP_SUFFIX = ".tmp"
CRASH_ENV = "CLADAPT_TEST_CRASH_AT"
#: Added to every open of a file the registry writes or reads as state: a planted symlink makes
#: the open fail (ELOOP) instead of redirecting the write outside the registry.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def crash_point(name: str) -> None:
    """Test seam: SIGKILL this process at step ``name`` when ``CLADAPT_TEST_CRASH_AT`` says so.

    The crash tests use it to prove that a kill at any step of a commit, status change or removal
    loses nothing (the names are listed in :mod:`cladapt.registry.store`); never set it otherwise.
    """
    if os.environ.get(CRASH_ENV) == name:
        logger.warning("%s=%s: killing this process on purpose", CRASH_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


def refuse_symlinks(root: Path, path: Path) -> Path:
    """Return ``path`` after checking that no component of it below ``root`` is a symbolic link.

    Components that do not exist yet are fine (they will be created as real folders). The
    registry root itself may be a link (``~/.cladapt -> /data/cladapt``); everything below it must
    be real, because a planted link (``tasks/x -> /elsewhere``) would otherwise make the registry
    read foreign files as its own and write outside itself.

    Raises:
        RegistryError: naming the link and where it points.
    """
    current = Path(root)
    for part in Path(path).relative_to(root).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break
        if stat.S_ISLNK(mode):
            raise RegistryError(
                f"refusing to use {current}: it is a symbolic link (to {os.readlink(current)!r}) inside the registry",
                hint="the registry never follows links below its root; replace the link by the real file or folder",
            )
    return path


def find_symlinks(root: Path) -> list[str]:
    """Every symbolic link below ``root`` (not followed), as sorted relative POSIX paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames + filenames:
            if (base / name).is_symlink():
                found.append((base / name).relative_to(root).as_posix())
    return sorted(found)


def is_tmp_name(name: str) -> bool:
    """True for the temporary files that :func:`atomic_write_bytes` leaves behind when killed."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, creations, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk (a file written by someone else, e.g. PEFT's save_pretrained)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (bottom-up, so parents are synced last).

    Called on a staging directory before it is renamed into the registry: the rename is only a
    promise that the *entries* exist; the data blocks must already be on disk.
    """
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
    try:
        # O_EXCL never follows a link at the temporary's name; os.replace then swaps the directory
        # entry itself, so a link planted at ``path`` is replaced, never written through.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o644)
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave a half-written temporary behind on an ordinary error (a SIGKILL still can,
        # which is why the name is recognisable).
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def dumps_json(obj: Any) -> bytes:
    """The registry's one JSON encoding: UTF-8, indented, stable key order, trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as JSON (see :func:`dumps_json`)."""
    atomic_write_bytes(path, dumps_json(obj))


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of an in-memory blob."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """Hex sha256 and size of a file, read in 1 MiB chunks so big adapters do not fill memory."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def iter_files(root: Path) -> Iterator[Path]:
    """Every entry below ``root`` that is not a directory, sorted, as paths relative to ``root``.

    Symlinks are yielded (not followed) so callers can refuse them: a link could point anywhere.
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        # os.walk lists symlinks to directories among dirnames; report them as files to refuse.
        linked = [d for d in dirnames if (base / d).is_symlink()]
        for name in sorted(filenames + linked):
            yield (base / name).relative_to(root)


def read_nofollow(path: Path) -> bytes:
    """Read a whole file, refusing a symbolic link at ``path`` (RegistryError) instead of following it."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise RegistryError(
                f"refusing to read {path}: it is a symbolic link inside the registry",
                hint="replace the link by the real file",
            ) from exc
        raise
    with open(fd, "rb") as fh:
        return fh.read()


def open_append(path: Path) -> int:
    """Open ``path`` for appending (created if missing) without following a symlink; returns the fd."""
    try:
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | O_NOFOLLOW, 0o644)
    except OSError as exc:
        if os.path.islink(path):
            raise RegistryError(
                f"refusing to write {path}: it is a symbolic link (to {os.readlink(path)!r}) inside the registry",
                hint="remove the link; the registry never writes through links",
            ) from exc
        raise


def last_line(fd: int) -> tuple[bytes | None, int]:
    """The last newline-terminated line of an open file (without its newline) and the offset just
    after it, where a torn tail (if any) starts. ``(None, 0)`` when the file has no complete line."""
    buf = b""
    pos = os.fstat(fd).st_size
    while pos > 0:
        start = max(0, pos - 65536)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        last_nl = buf.rfind(b"\n")
        if last_nl < 0:
            continue
        prev_nl = buf.rfind(b"\n", 0, last_nl)
        if prev_nl >= 0 or pos == 0:
            return buf[prev_nl + 1 : last_nl], pos + last_nl + 1
    return None, 0


def append_line(path: Path, line: str, *, fd: int | None = None) -> None:
    """Append one line durably; a torn last line left by a writer killed mid-append is cut off.

    A torn tail is an event whose writer died before finishing it (the registry re-appends events
    that matter from its own records, see :meth:`Store.open`), so it is truncated rather than kept
    as a malformed line. The caller serialises appenders (the registry lock), so inspecting the
    tail and writing is not racy. The open refuses a symlink at ``path``.
    """
    own = fd is None
    fd = open_append(path) if fd is None else fd
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            _, keep = last_line(fd)
            logger.warning("%s: cutting a torn last line of %d byte(s) (a writer was killed mid-append)", path, size - keep)
            os.ftruncate(fd, keep)
        os.write(fd, line.encode("utf-8") + b"\n")
        os.fsync(fd)
    finally:
        if own:
            os.close(fd)
