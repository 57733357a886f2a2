"""The registry's inter-process lock: ``fcntl.flock`` on ``<root>/.work/lock``.

Only short metadata updates hold it (allocating a version number, renaming a staged directory into
place, rewriting ``status.json`` and the index, appending to the audit log); training never does.
``flock`` is released by the kernel when its holder dies, so a SIGKILLed process cannot leave the
registry locked.

The lock is re-entrant within a thread (a depth counter), so a locked method may call another.
Different threads of one process still exclude each other: each opens its own file description,
and flock locks belong to the open file description.

The lock file is opened with ``O_NOFOLLOW`` and its folder is checked for links below the
registry root: a ``.work/lock`` planted as a link to some other file must not get that file
truncated (the holder's pid is written into the lock file).

Why not the ``filelock`` package (installed, through torch, datasets and huggingface_hub): the registry's promises
would then rest on options whose defaults and existence vary across its releases (the soft-lock
fallback, on by default in 4.x, leaves a lock that survives a SIGKILL and must be switched off;
cross-instance re-entrancy needs ``is_singleton``; ``O_NOFOLLOW`` on the lock file is recent),
it does not check the lock's folder for links, and it is not a declared dependency. The few lines
of ``flock`` below are the whole mechanism, tested by tests/registry (kills, threads, re-entrancy, links).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from types import TracebackType

from cladapt.errors import RegistryError
from cladapt.registry.fsio import O_NOFOLLOW, refuse_symlinks

logger = logging.getLogger(__name__)

#: Seconds to wait for the lock before giving up; override with CLADAPT_LOCK_TIMEOUT.
DEFAULT_TIMEOUT_S = 300.0

_LOCKS: dict[str, StoreLock] = {}
_REGISTRY_GUARD = threading.Lock()


class StoreLock:
    """A re-entrant (per thread) exclusive lock on one file, usable as a context manager."""

    def __init__(self, path: Path, *, timeout_s: float | None = None, root: Path | None = None) -> None:
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self._timeout_s = timeout_s
        self._local = threading.local()

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
        flock when a second instance asks for it. ``root`` is the folder below which no path
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
        """Take the lock, polling with back-off until ``timeout_s``; re-entrant per thread."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            return
        timeout_s = self.timeout_s
        fd = self._open()
        deadline = time.monotonic() + timeout_s
        delay = 0.002
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RegistryError(
                            f"the registry is locked by another process ({self._holder(fd)}) for over {timeout_s:.0f} s",
                            hint=f"wait for it to finish, or raise CLADAPT_LOCK_TIMEOUT; lock file: {self.path}",
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            # Record the holder for the message above; informational only.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._local.fd = fd
        self._local.depth = 1

    def release(self) -> None:
        """Release one level; the flock is dropped when the outermost level exits."""
        depth = getattr(self._local, "depth", 0)
        if depth <= 0:
            raise RuntimeError("StoreLock.release() without acquire()")
        self._local.depth = depth - 1
        if depth == 1:
            fd = self._local.fd
            self._local.fd = None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _open(self) -> int:
        """Open (creating) the lock file without following links; clear errors for a read-only registry."""
        refuse_symlinks(self.root, self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW, 0o644)
        except OSError as exc:
            if os.path.islink(self.path):
                raise RegistryError(
                    f"refusing to open the lock {self.path}: it is a symbolic link (to {os.readlink(self.path)!r})",
                    hint="remove the link; the registry never writes through links",
                ) from exc
            read_only = exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            raise RegistryError(
                f"cannot take the registry lock {self.path}: {exc.strerror or exc}",
                hint="the registry is read-only here (a read-only mount or missing permissions): listing and "
                "serving work, changes need write access to the registry folder"
                if read_only else "the lock must be a regular file; remove whatever is at that path",
            ) from exc

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown holder"
        except OSError:
            return "unknown holder"

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Claim:
    """A process's hold on one scratch folder of ``.work`` (a staging area, a run's checkpoints):
    an exclusive ``flock`` on ``<folder>.lock``, kept for as long as the process works there.

    The kernel drops it when the process dies, so ``registry gc`` can tell a live process's folder
    (claimed) from a killed one's leftovers (unclaimed) without guessing from timestamps.
    """

    def __init__(self, lock_path: Path, fd: int) -> None:
        self.lock_path = Path(lock_path)
        self._fd: int | None = fd

    @classmethod
    def take(cls, lock_path: Path) -> Claim | None:
        """Claim ``lock_path`` (created), or None if a live process holds it."""
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(lock_path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, remove: bool = False) -> None:
        """Drop the claim; ``remove`` also deletes the lock file (the folder is gone). Idempotent."""
        if self._fd is None:
            return
        if remove:
            self.lock_path.unlink(missing_ok=True)
        fd, self._fd = self._fd, None
        os.close(fd)

    def __repr__(self) -> str:
        return f"Claim({str(self.lock_path)!r}, held={self.held})"


def claim_path(folder: Path) -> Path:
    """The lock file that claims ``folder``: ``<folder>.lock`` beside it (never inside: a staging
    folder becomes a version, and the lock must not be committed with it)."""
    return folder.with_name(folder.name + ".lock")
