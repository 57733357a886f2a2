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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
TMP_SUFFIX = ".tmp"


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
        with open(tmp, "xb") as fh:
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


def append_line(path: Path, line: str) -> None:
    """Append one line durably; repairs a torn last line left by a writer killed mid-append.

    The caller serialises appenders (the registry lock), so checking the last byte and writing is
    not racy. ``O_APPEND`` makes each write land at the end even if a file is shared.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        prefix = b""
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    prefix = b"\n"
        os.write(fd, prefix + line.encode("utf-8") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
