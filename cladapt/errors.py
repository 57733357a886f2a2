"""The cladapt error hierarchy.

Every error a user can cause is a :class:`CladaptError`. Each one says *what* is wrong, *where*
(file:line, key path, adapter ref) and *how to fix it* (``hint``). The CLI prints ``str(err)`` and
the hint and exits with :attr:`CladaptError.exit_code`; a future HTTP server maps
:attr:`CladaptError.http_status` to an OpenAI-style error body. Standard library only (layer 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class CladaptError(Exception):
    """Base class of every user-facing error."""

    exit_code: int = 1
    http_status: int = 400

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Issue:
    """One problem found while validating something (a config key, a data row)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class _MultiIssueError(CladaptError):
    """An error that carries every problem found, not just the first one."""

    title = "invalid input"

    def __init__(self, issues: Iterable[Issue], *, hint: str | None = None, title: str | None = None) -> None:
        self.issues = list(issues)
        head = title or self.title
        shown = self.issues[:50]
        lines = [f"{head} ({len(self.issues)} problem{'s' if len(self.issues) != 1 else ''}):"]
        lines += [f"  - {i}" for i in shown]
        if len(self.issues) > len(shown):
            lines.append(f"  ... and {len(self.issues) - len(shown)} more")
        super().__init__("\n".join(lines), hint=hint)


class ConfigError(_MultiIssueError):
    """A configuration file, preset or ``--set`` override is invalid."""

    title = "invalid configuration"


class DataError(_MultiIssueError):
    """Training or evaluation data is invalid. Issues name the file, line and field."""

    title = "invalid data"


class PluginNotFound(CladaptError):
    """An unknown method, router or regularizer name."""

    http_status = 404


class RegistryError(CladaptError):
    """Something is wrong with the adapter registry."""


class NotFound(RegistryError):
    """A task, version or registry that does not exist."""

    http_status = 404


class Conflict(RegistryError):
    """An operation that would break the registry's invariants (e.g. removing a parent)."""

    http_status = 409


class IntegrityError(RegistryError):
    """A stored blob does not match its recorded sha256, or the index disagrees with manifests."""

    http_status = 500


class IncompatibleBaseModel(RegistryError):
    """An adapter (or recorded statistic) was made for another base model."""


class CapacityError(CladaptError):
    """A continual-learning method has run out of room (rank, orthogonal subspace)."""


class ModelError(CladaptError):
    """The base model cannot be resolved, converted or loaded."""


class UsageError(CladaptError):
    """The command line itself is wrong."""

    exit_code = 2
