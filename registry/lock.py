"""The registry's inter-process lock: ``fcntl.flock`` on ``<root>/.work/lock``.

Only short metadata updates hold it (allocating a version number, renaming a staged directory into
place, rewriting ``status.json`` and the index, appending to the audit log); training never does.
``flock`` is released by the kernel when its holder dies, so a SIGKILLed process cannot leave the
registry locked.

The lock is re-entrant within a thread (a depth counter), so a locked method may call another.
Different threads of one process still exclude each other: each opens its own file description,
and flock locks belong to the open file description.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from types import TracebackType

from cladapt.errors import RegistryError

logger = logging.getLogger(__name__)

#: Seconds to wait for the lock before giving up; override with CLADAPT_LOCK_TIMEOUT.
DEFAULT_TIMEOUT_S = 300.0

_LOCKS: dict[str, StoreLock] = {}
_REGISTRY_GUARD = threading.Lock()


class StoreLock:
    """A re-entrant (per thread) exclusive lock on one file, usable as a context manager."""

    def __init__(self, path: Path, *, timeout_s: float | None = None) -> None:
        self.path = Path(path)
        env = os.environ.get("CLADAPT_LOCK_TIMEOUT")
        self.timeout_s = timeout_s if timeout_s is not None else float(env) if env else DEFAULT_TIMEOUT_S
        self._local = threading.local()

    @classmethod
    def for_path(cls, path: Path) -> StoreLock:
        """The one lock object of this process for ``path``.

        Sharing it between Store instances of the same registry keeps re-entrancy working across
        them: a thread holding the lock through one instance would otherwise deadlock on its own
        flock when a second instance asks for it.
        """
        key = os.path.realpath(path)
        with _REGISTRY_GUARD:
            lock = _LOCKS.get(key)
            if lock is None:
                lock = _LOCKS[key] = cls(Path(key))
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        delay = 0.002
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RegistryError(
                            f"the registry is locked by another process ({self._holder(fd)}) for over {self.timeout_s:.0f} s",
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
