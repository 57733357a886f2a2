"""The registry's inter-process lock on ``<root>/.work/lock``, through the ``filelock`` package.

Only short metadata updates hold it (allocating a version number, renaming a staged directory into
place, rewriting ``status.json`` and the index, appending to the audit log); training never does.
``filelock`` takes an OS lock (``flock`` on POSIX, ``LockFileEx`` on Windows), which the kernel
releases when its holder dies, so a SIGKILLed process cannot leave the registry locked.

Options chosen on purpose, because the package's defaults would weaken a promise:

- ``fallback_to_soft=False``: on a filesystem without ``flock`` filelock would otherwise fall back to
  a marker file that survives a SIGKILL; the registry refuses such a folder instead of trusting it.
- ``thread_local=True`` with one :class:`StoreLock` per path and process (:meth:`StoreLock.for_path`):
  re-entrant within a thread, across Store instances of one registry, while different threads still
  exclude each other (each thread opens its own file description).
- The lock's folder is checked for links below the registry root before each acquire, and filelock
  opens the lock file with ``O_NOFOLLOW``: a ``.work/lock`` planted as a link to some other file
  must not get that file truncated (the holder's pid is written into the lock file).

:class:`Claim` marks a scratch folder as in use by a live process (a non-blocking try of the same
kind of lock, held for as long as the process works there).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from cladapt.errors import RegistryError
from cladapt.registry.fsio import O_NOFOLLOW, refuse_symlinks

logger = logging.getLogger(__name__)

#: Seconds to wait for the lock before giving up; override with CLADAPT_LOCK_TIMEOUT.
DEFAULT_TIMEOUT_S = 300.0
#: Seconds between two attempts while another process holds the lock.
POLL_S = 0.01

_LOCKS: dict[str, StoreLock] = {}
_REGISTRY_GUARD = threading.Lock()


def _write_holder(fd: int) -> None:
    """Record the holder in the lock file (informational: the timeout message names it)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)


def _file_lock(path: Path, *, thread_local: bool, on_acquired: bool) -> FileLock:
    return FileLock(
        path, thread_local=thread_local, fallback_to_soft=False, mode=0o644, poll_interval=POLL_S,
        on_acquired=_write_holder if on_acquired else None,
    )


class StoreLock:
    """A re-entrant (per thread) exclusive lock on one file, usable as a context manager."""

    def __init__(self, path: Path, *, timeout_s: float | None = None, root: Path | None = None) -> None:
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._file_lock = _file_lock(self.path, thread_local=True, on_acquired=True)

    @property
    def timeout_s(self) -> float:
        """Seconds to wait: the constructor's value, else ``$CLADAPT_LOCK_TIMEOUT``, else 300."""
        if self._timeout_s is not None:
            return self._timeout_s
        env = os.environ.get("CLADAPT_LOCK_TIMEOUT")
        if not env:
            return DEFAULT_TIMEOUT_S
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not value >= 0:  # also refuses nan
            raise RegistryError(
                f"CLADAPT_LOCK_TIMEOUT={env!r} is not a number of seconds >= 0",
                hint="set it to e.g. 600, or unset it for the default of 300 s",
            )
        return value

    @classmethod
    def for_path(cls, path: Path, *, root: Path | None = None) -> StoreLock:
        """The one lock object of this process for ``path``.

        Sharing it between Store instances of the same registry keeps re-entrancy working across
        them: a thread holding the lock through one instance would otherwise deadlock on its own
        lock when a second instance asks for it. ``root`` is the folder below which no path
        component of the lock may be a symbolic link (default: the lock's own folder).
        """
        key = os.path.join(os.path.realpath(Path(path).parent), Path(path).name)
        with _REGISTRY_GUARD:
            lock = _LOCKS.get(key)
            if lock is None:
                lock = _LOCKS[key] = cls(Path(path), root=root)
            return lock

    @property
    def held(self) -> bool:
        """True when the calling thread holds the lock."""
        return getattr(self._local, "depth", 0) > 0

    def acquire(self) -> None:
        """Take the lock, waiting up to ``timeout_s``; re-entrant per thread."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            return
        timeout_s = self.timeout_s
        self._prepare()
        try:
            self._file_lock.acquire(timeout=timeout_s)
        except Timeout:
            raise RegistryError(
                f"the registry is locked by another process ({self._holder()}) for over {timeout_s:.0f} s",
                hint=f"wait for it to finish, or raise CLADAPT_LOCK_TIMEOUT; lock file: {self.path}",
            ) from None
        except OSError as exc:
            raise self._open_error(exc) from exc
        self._local.depth = 1

    def release(self) -> None:
        """Release one level; the OS lock is dropped when the outermost level exits."""
        depth = getattr(self._local, "depth", 0)
        if depth <= 0:
            raise RuntimeError("StoreLock.release() without acquire()")
        self._local.depth = depth - 1
        if depth == 1:
            self._file_lock.release()

    def _prepare(self) -> None:
        """Refuse links below the registry root; create the lock's folder (clear error when read-only)."""
        refuse_symlinks(self.root, self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._open_error(exc) from exc

    def _open_error(self, exc: OSError) -> RegistryError:
        if os.path.islink(self.path):
            return RegistryError(
                f"refusing to open the lock {self.path}: it is a symbolic link (to {os.readlink(self.path)!r})",
                hint="remove the link; the registry never writes through links",
            )
        read_only = exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        return RegistryError(
            f"cannot take the registry lock {self.path}: {exc.strerror or exc}",
            hint="the registry is read-only here (a read-only mount or missing permissions): listing and "
            "serving work, changes need write access to the registry folder"
            if read_only else "the lock must be a regular file; remove whatever is at that path",
        )

    def _holder(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | O_NOFOLLOW)
        except OSError:
            return "unknown holder"
        try:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown holder"
        except OSError:
            return "unknown holder"
        finally:
            os.close(fd)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Claim:
    """A process's hold on one scratch folder of ``.work`` (a staging area, a run's checkpoints):
    an exclusive lock on ``<folder>.lock``, kept for as long as the process works there.

    The OS drops it when the process dies, so ``registry gc`` can tell a live process's folder
    (claimed) from a killed one's leftovers (unclaimed) without guessing from timestamps.
    """

    def __init__(self, lock_path: Path, lock: FileLock) -> None:
        self.lock_path = Path(lock_path)
        self._lock: FileLock | None = lock

    @classmethod
    def take(cls, lock_path: Path) -> Claim | None:
        """Claim ``lock_path`` (created), or None if a live process holds it."""
        lock = _file_lock(Path(lock_path), thread_local=False, on_acquired=False)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            return None
        return cls(lock_path, lock)

    @property
    def held(self) -> bool:
        return self._lock is not None

    def release(self, *, remove: bool = False) -> None:
        """Drop the claim; ``remove`` also deletes the lock file (the folder is gone). Idempotent."""
        if self._lock is None:
            return
        if remove:
            self.lock_path.unlink(missing_ok=True)
        lock, self._lock = self._lock, None
        lock.release()

    def __repr__(self) -> str:
        return f"Claim({str(self.lock_path)!r}, held={self.held})"


def claim_path(folder: Path) -> Path:
    """The lock file that claims ``folder``: ``<folder>.lock`` beside it (never inside: a staging
    folder becomes a version, and the lock must not be committed with it)."""
    return folder.with_name(folder.name + ".lock")
