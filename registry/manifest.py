"""The per-version metadata schema (``manifest.json``), the per-task ``status.json``, and integrity.

A version directory is immutable once committed; its ``manifest.json`` records *everything* needed
to reproduce and trust it: the method and its config, the base model's fingerprint, the LoRA
shape, the data's hash, the seed, the lineage (``parents``) and the sha256 of every file. Status
(active / candidate / rejected / archived) is deliberately *not* in the manifest: it changes over
time, so it lives in ``tasks/<task>/status.json``, which is replaced atomically.

The SQLite index is derived from these two files and can always be rebuilt from them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cladapt.errors import IntegrityError, NotFound, RegistryError
from cladapt.registry.fsio import (
    is_tmp_name,
    iter_files,
    read_nofollow,
    refuse_symlinks,
    sha256_bytes,
    sha256_file,
)
from cladapt.registry.refs import AdapterRef, validate_relpath, validate_task_name
from cladapt.registry.status import STATUSES, unseal_json

__all__ = [  # STATUSES is re-exported: it used to be defined here
    "STATUSES", "FileEntry", "Manifest", "Problem", "VersionRecord", "check_evals", "check_version", "load_manifest",
    "make_record", "read_manifest", "read_verified", "unlisted_files", "verify_entries",
]

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 1
Composition = Literal["route", "sum", "single"]
#: Files a version may never contain: formats that unpickle (run code) when loaded.
FORBIDDEN_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
_UPGRADE_HINT = "upgrade cladapt (pip install -U cladapt) to read this registry"


@dataclass(frozen=True)
class Problem:
    """One inconsistency found by :meth:`Store.verify`: where it is and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class FileEntry(BaseModel):
    """One file of a version, relative to the version directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        try:
            return validate_relpath(value)
        except RegistryError as exc:
            raise ValueError(exc.message) from exc


class Manifest(BaseModel):
    """The immutable record of one adapter version (``tasks/<task>/v<N>/manifest.json``)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    task: str
    version: int = Field(ge=1)
    method: str = Field(min_length=1)
    method_config: dict[str, Any] = Field(default_factory=dict)
    composition: Composition
    base_model: dict[str, Any]  # {"id", "fingerprint", "tokenizer_fingerprint"}
    lora: dict[str, Any]  # {"r", "alpha", "dropout", "target_modules"}
    data: dict[str, Any]  # {"files", "sha256", "rows"}
    config: dict[str, Any]  # the fully resolved run config
    seed: int
    created: str  # ISO-8601 UTC
    parents: list[str] = Field(default_factory=list)
    train_stats: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: list[FileEntry] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value > MANIFEST_SCHEMA_VERSION:
            raise ValueError(f"schema_version {value} is newer than this cladapt understands ({MANIFEST_SCHEMA_VERSION})")
        return value

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        try:
            return validate_task_name(value)
        except RegistryError as exc:
            raise ValueError(exc.message) from exc

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: dict[str, Any]) -> dict[str, Any]:
        # The fingerprint is what keeps an adapter off the wrong base model: it must be there.
        for key in ("id", "fingerprint"):
            if not isinstance(value.get(key), str) or not value[key]:
                raise ValueError(f"base_model.{key} must be a non-empty string")
        return value

    @field_validator("lora")
    @classmethod
    def _lora(cls, value: dict[str, Any]) -> dict[str, Any]:
        r, alpha = value.get("r"), value.get("alpha")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"lora.r must be an integer >= 1, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise ValueError(f"lora.alpha must be a number, got {alpha!r}")
        return value

    @field_validator("parents")
    @classmethod
    def _parents(cls, value: list[str]) -> list[str]:
        # Stored in canonical form ("amazon@3") so the index and dependants checks compare equal.
        canonical: list[str] = []
        for text in value:
            try:
                ref = AdapterRef.parse(text)
            except RegistryError as exc:
                raise ValueError(exc.message) from exc
            if ref.version is None:
                raise ValueError(f"parent {text!r} must name a version, e.g. '{ref.task}@1'")
            if str(ref) not in canonical:
                canonical.append(str(ref))
        return canonical

    @model_validator(mode="after")
    def _unique_files(self) -> Manifest:
        seen: set[str] = set()
        for entry in self.files:
            if entry.path in seen:
                raise ValueError(f"file {entry.path!r} is listed twice")
            seen.add(entry.path)
        return self

    @property
    def ref(self) -> AdapterRef:
        """The explicit ref of this version."""
        return AdapterRef(self.task, self.version)

    def file(self, relpath: str) -> FileEntry | None:
        """The entry for ``relpath``, or None."""
        return next((e for e in self.files if e.path == relpath), None)

    def find(self, relpath: str, ref: AdapterRef | str) -> FileEntry:
        """The entry for a user-given path; a bare name means ``sidecars/<name>``, and a sidecar
        may be named without its extension when that is unambiguous (``signature``).

        Raises:
            RegistryError: the path is unsafe. NotFound: no such file in this version.
        """
        relpath = validate_relpath(relpath)
        relpath = relpath if "/" in relpath else f"sidecars/{relpath}"
        entry = self.file(relpath)
        if entry is None and relpath.startswith("sidecars/") and "." not in relpath:
            stems = [e for e in self.files if e.path.startswith(relpath + ".") and e.path.count("/") == 1]
            entry = stems[0] if len(stems) == 1 else None
        if entry is None:
            known = [e.path for e in self.files if not e.path.startswith("adapter/")]
            raise NotFound(f"{ref} has no file {relpath!r}", hint=f"its files: {', '.join(known) or '(none)'}")
        return entry


def format_validation_error(exc: ValidationError, *, prefix: str = "") -> list[str]:
    """Turn pydantic's errors into 'key.path: message' lines (all of them, not only the first)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"{prefix}{loc}: {err['msg']}" if loc else f"{prefix}{err['msg']}")
    return lines


def load_manifest(path: Path) -> Manifest:
    """Read and validate one ``manifest.json`` (see :func:`read_manifest`)."""
    return read_manifest(path)[0]


def read_manifest(path: Path) -> tuple[Manifest, str]:
    """Read and validate one ``manifest.json``; also return the sha256 of its bytes.

    Raises:
        RegistryError: the manifest was written by a newer cladapt.
        IntegrityError: the file is missing, a link, not JSON, or does not match the schema.
    """
    try:
        data = read_nofollow(path)
        raw = json.loads(data)
    except (OSError, ValueError, RegistryError) as exc:
        detail = exc.message if isinstance(exc, RegistryError) else str(exc)
        raise IntegrityError(f"{path}: unreadable manifest ({detail})", hint="run `cladapt registry verify`") from exc
    if isinstance(raw, dict) and isinstance(raw.get("schema_version"), int) and raw["schema_version"] > MANIFEST_SCHEMA_VERSION:
        raise RegistryError(f"{path}: manifest schema {raw['schema_version']} is newer than this cladapt", hint=_UPGRADE_HINT)
    try:
        return Manifest.model_validate(raw), sha256_bytes(data)
    except ValidationError as exc:
        detail = "; ".join(format_validation_error(exc))
        raise IntegrityError(f"{path}: invalid manifest: {detail}", hint="run `cladapt registry verify`") from exc


@dataclass(frozen=True)
class VersionRecord:
    """One version as listed by the store: index columns plus the full manifest.

    ``parents`` is a tuple (not a list) so the record stays hashable and immutable.
    """

    task: str
    version: int
    status: str
    method: str
    composition: str
    r: int
    alpha: float
    base_fingerprint: str
    created: str
    parents: tuple[str, ...]
    path: Path
    manifest: Manifest = field(repr=False, compare=False)

    @property
    def ref(self) -> AdapterRef:
        """The explicit ref (``amazon@3``)."""
        return AdapterRef(self.task, self.version)

    @property
    def peft_name(self) -> str:
        """The PEFT adapter name (``amazon__v3``)."""
        return self.ref.peft_name

    @property
    def metrics(self) -> dict[str, Any]:
        """Metrics recorded at commit time (later evaluations: :meth:`Store.evaluations`)."""
        return self.manifest.metrics


def make_record(manifest: Manifest, status: str, path: Path) -> VersionRecord:
    """Build a :class:`VersionRecord` from a manifest and its current status."""
    return VersionRecord(
        task=manifest.task,
        version=manifest.version,
        status=status,
        method=manifest.method,
        composition=manifest.composition,
        r=int(manifest.lora["r"]),
        alpha=float(manifest.lora["alpha"]),
        base_fingerprint=str(manifest.base_model["fingerprint"]),
        created=manifest.created,
        parents=tuple(manifest.parents),
        path=path,
        manifest=manifest,
    )


# --------------------------------------------------------------------------------------------
# Integrity: every read goes through these, so a flipped byte is caught before it is used.


def read_verified(version_dir: Path, entry: FileEntry, ref: AdapterRef) -> bytes:
    """Read one file of a version and check its size and sha256 against the manifest.

    Reading the bytes once and hashing those same bytes avoids a check-then-read race.
    """
    path = version_dir / entry.path
    try:
        data = read_nofollow(refuse_symlinks(version_dir, path))
    except (OSError, RegistryError) as exc:
        detail = exc.message if isinstance(exc, RegistryError) else str(exc)
        raise IntegrityError(f"{ref}: file {entry.path!r} is missing or unreadable ({detail})", hint=_verify_hint()) from exc
    if len(data) != entry.size or sha256_bytes(data) != entry.sha256:
        raise IntegrityError(f"{ref}: file {entry.path!r} does not match its sha256 in the manifest", hint=_verify_hint())
    return data


def verify_entries(version_dir: Path, entries: list[FileEntry], ref: AdapterRef) -> None:
    """Hash each file (streaming) and raise IntegrityError naming the first one that differs."""
    for entry in entries:
        problem = _check_entry(version_dir, entry)
        if problem:
            raise IntegrityError(f"{ref}: file {entry.path!r} {problem}", hint=_verify_hint())


def unlisted_files(version_dir: Path, manifest: Manifest, under: str = "") -> list[str]:
    """Files present on disk but absent from the manifest (``evals/`` and ``manifest.json`` excepted).

    An unlisted file inside ``adapter/`` matters: PEFT would happily load, say, an injected
    ``adapter_model.bin`` (a pickle) if it found one.
    """
    listed = {e.path for e in manifest.files}
    root = version_dir / under if under else version_dir
    if not root.is_dir():
        return []
    extra = []
    for rel in iter_files(root):
        relpath = f"{under}/{rel.as_posix()}" if under else rel.as_posix()
        if relpath == "manifest.json" or relpath.startswith("evals/"):
            continue
        if relpath not in listed:
            extra.append(relpath)
    return extra


def check_version(version_dir: Path, manifest: Manifest) -> list[Problem]:
    """Every integrity problem of one version (for ``verify``): bad hashes, missing or extra files."""
    where = f"{manifest.task}@{manifest.version}"
    problems = [Problem(where, f"file {e.path!r} {p}") for e in manifest.files if (p := _check_entry(version_dir, e))]
    problems += [Problem(where, f"file {p!r} is not listed in the manifest") for p in unlisted_files(version_dir, manifest)]
    if version_dir.name != f"v{manifest.version}" or version_dir.parent.name != manifest.task:
        problems.append(Problem(where, f"manifest is stored at {version_dir}, which does not match its task/version"))
    return problems


def check_evals(version_dir: Path, where: str) -> tuple[list[Problem], int]:
    """Evaluation files (``evals/*.json``) that are unreadable, not JSON or do not match their
    checksum, and the number of evaluations written before checksums existed (not covered)."""
    evals = version_dir / "evals"
    problems = []
    legacy = 0
    for path in sorted(evals.iterdir()) if evals.is_dir() and not evals.is_symlink() else []:
        if is_tmp_name(path.name):
            continue
        try:
            legacy += not unseal_json(read_nofollow(path), f"evaluation {path.name!r}")[1]
        except (OSError, RegistryError) as exc:
            problems.append(Problem(where, exc.message if isinstance(exc, RegistryError) else f"evaluation {path.name!r}: {exc}"))
    return problems, legacy


def _check_entry(version_dir: Path, entry: FileEntry) -> str | None:
    path = version_dir / entry.path
    try:
        refuse_symlinks(version_dir, path)
    except RegistryError:
        return "is reached through a symbolic link (refused)"
    if path.is_symlink() or not path.is_file():
        return "is missing (or is not a regular file)"
    digest, size = sha256_file(path)
    if size != entry.size:
        return f"has size {size}, the manifest says {entry.size}"
    if digest != entry.sha256:
        return "does not match its sha256 in the manifest"
    return None


def _verify_hint() -> str:
    return "the stored adapter is corrupt or was modified; run `cladapt registry verify` and re-train or re-pull it"
