"""Names and references: the grammar users type (``amazon@3``) and the checks that keep them safe.

Every name the registry turns into a path component (task names, sidecar and evaluation names,
shared-state kinds and keys, paths inside a version) is validated here, so that no user input can
reach outside the registry root (``..``, ``/``, absolute paths) or create hidden files.

Two spellings of one adapter exist, as in vLLM: the external :class:`AdapterRef` (``amazon@3``)
and the internal PEFT adapter name (``amazon__v3``). PEFT names become ``torch.nn.ModuleDict`` keys,
which may not contain ``.``, hence the separate form.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from cladapt.errors import RegistryError

logger = logging.getLogger(__name__)

TASK_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_TASK_NAME = re.compile(TASK_NAME_RE)
#: Keys of shared state (e.g. a base-model fingerprint) may be longer and may contain dots.
SHARED_KEY_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_SHARED_KEY = re.compile(SHARED_KEY_RE)
#: One component of a path stored in a version: no leading dot (so no ``.``/``..``/hidden files).
_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,254}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")
_PEFT_NAME = re.compile(r"^(?P<task>.+)__v(?P<version>[1-9][0-9]{0,8})$")

_NAME_HINT = "use 1-64 letters, digits, '_' or '-', starting with a letter or digit (e.g. 'amazon')"


def validate_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise :class:`RegistryError` naming it."""
    return validate_name(name, what="task name")


def validate_name(name: str, *, what: str = "name") -> str:
    """Validate a single registry name (task, evaluation, shared-state kind) against TASK_NAME_RE."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise RegistryError(f"invalid {what} {name!r}", hint=_NAME_HINT)
    return name


def validate_shared_key(key: str) -> str:
    """Validate a shared-state key: like a name, but up to 128 chars and dots allowed (not '..')."""
    if not isinstance(key, str) or not _SHARED_KEY.fullmatch(key) or ".." in key:
        raise RegistryError(
            f"invalid shared-state key {key!r}",
            hint="use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit, without '..'",
        )
    return key


def validate_filename(name: str, *, what: str = "file name") -> str:
    """Validate one path component (a sidecar name): no '/', no '..', no leading dot."""
    if not isinstance(name, str) or not _PATH_PART.fullmatch(name):
        raise RegistryError(
            f"invalid {what} {name!r}",
            hint="use letters, digits and '_.+=-', not starting with '.', and no '/' (e.g. 'signature.safetensors')",
        )
    return name


def validate_relpath(relpath: str, *, what: str = "path") -> str:
    """Validate a relative POSIX path inside a version directory and return it normalised.

    Absolute paths, backslashes, empty components, ``.`` and ``..`` are all refused rather than
    normalised away: a path that needs normalising was not written by cladapt.
    """
    if not isinstance(relpath, str) or not relpath or relpath.startswith("/") or "\\" in relpath:
        raise RegistryError(f"invalid {what} {relpath!r}", hint="use a relative path like 'sidecars/basis.safetensors'")
    parts = relpath.split("/")
    for part in parts:
        if not _PATH_PART.fullmatch(part):
            raise RegistryError(
                f"invalid {what} {relpath!r}: bad component {part!r}",
                hint="components use letters, digits and '_.+=-', never '.', '..' or a leading dot",
            )
    return "/".join(parts)


@dataclass(frozen=True)
class AdapterRef:
    """A reference to one adapter version: ``task`` plus a version number.

    ``version=None`` means "the active version" (or, when none is active, the newest version that
    was not rejected). ``latest=True`` means "the highest version number, whatever its status".

    Attributes:
        task: validated task name.
        version: explicit version (>= 1) or None.
        latest: the ``task@latest`` selector; mutually exclusive with ``version``.
    """

    task: str
    version: int | None = None
    latest: bool = False

    def __post_init__(self) -> None:
        validate_task_name(self.task)
        if self.version is not None:
            if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
                raise RegistryError(f"invalid version {self.version!r} for task {self.task!r}", hint="versions are integers >= 1")
            if self.latest:
                raise RegistryError(f"ref {self.task}@{self.version} cannot also be '@latest'")

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """Parse ``task``, ``task@3``, ``task@v3``, ``task@active`` or ``task@latest``."""
        if not isinstance(text, str):
            raise RegistryError(f"invalid adapter ref {text!r}", hint="write 'task' or 'task@3'")
        task, sep, selector = text.partition("@")
        if not _TASK_NAME.fullmatch(task):
            raise RegistryError(f"invalid adapter ref {text!r}: bad task name {task!r}", hint=_NAME_HINT)
        if not sep or selector == "active":
            return cls(task)
        if selector == "latest":
            return cls(task, latest=True)
        digits = selector[1:] if selector.startswith("v") else selector
        if not _VERSION.fullmatch(digits):
            raise RegistryError(
                f"invalid adapter ref {text!r}: bad version {selector!r}",
                hint=f"write '{task}', '{task}@3', '{task}@active' or '{task}@latest'",
            )
        return cls(task, int(digits))

    @classmethod
    def from_peft_name(cls, name: str) -> AdapterRef:
        """Inverse of :attr:`peft_name`: ``amazon__v3`` -> ``amazon@3``."""
        match = _PEFT_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise RegistryError(f"invalid PEFT adapter name {name!r}", hint="expected '<task>__v<version>'")
        return cls(match["task"], int(match["version"]))

    @property
    def is_explicit(self) -> bool:
        """True when the ref names one version number (not active/latest)."""
        return self.version is not None

    @property
    def peft_name(self) -> str:
        """The PEFT adapter name (``amazon__v3``); needs an explicit version."""
        if self.version is None:
            raise RegistryError(
                f"ref {self} has no version number, so it has no PEFT name",
                hint="resolve it first with Store.get(ref).ref",
            )
        return f"{self.task}__v{self.version}"

    def __str__(self) -> str:
        if self.latest:
            return f"{self.task}@latest"
        return self.task if self.version is None else f"{self.task}@{self.version}"


def coerce_ref(ref: AdapterRef | str) -> AdapterRef:
    """Accept an :class:`AdapterRef` or its text form."""
    return ref if isinstance(ref, AdapterRef) else AdapterRef.parse(ref)
