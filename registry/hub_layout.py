"""How a registry (or one version) is laid out in a Hugging Face Hub repo, and the index that lists it.

A registry repo::

    README.md                          the card: tasks, versions, scores, how to load
    cladapt-hub.json                   this module's :class:`HubIndex`: every file with its sha256
    policy.json                        the admission policy (if any)
    shared/<kind>/<key>/...            shared state (GeRe records ...) with its own manifest.json
    <task>__v<N>/adapter_config.json   one plain PEFT LoRA per version: PeftModel.from_pretrained(
    <task>__v<N>/adapter_model.safetensors   base, repo, subfolder="<task>__v<N>"); vLLM's Hub
    <task>__v<N>/README.md             resolver serves it as "<repo>/<task>__v<N>"
    <task>__v<N>/cladapt/manifest.json the version's manifest, unchanged
    <task>__v<N>/cladapt/sidecars/...  continual-learning state (safetensors / JSON)
    <task>__v<N>/cladapt/evals/...     evaluations attached after commit

A single-version repo is the same with the version folder at the root (``folder == ""``), so the
repo itself is a plain PEFT repo. Two files differ from the registry's bytes: ``adapter_config.json``
carries the base model's Hub id (the registry keeps whatever path trained it) and ``README.md`` is
cladapt's card. The index records the sha256 of the bytes pushed, and every other file is also
checked against the version's own manifest on pull.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cladapt.errors import IntegrityError, RegistryError
from cladapt.registry.manifest import FORBIDDEN_SUFFIXES, format_validation_error
from cladapt.registry.refs import AdapterRef, validate_name, validate_relpath, validate_shared_key

INDEX_FILE = "cladapt-hub.json"
INDEX_FORMAT = 1
#: Files of ``adapter/`` whose pushed bytes differ from the registry's (see the module docstring).
REWRITTEN = frozenset({"adapter/adapter_config.json", "adapter/README.md"})
#: Root files a registry repo may hold besides the index, the policy and the version folders.
ROOT_EXTRAS = frozenset({".gitattributes", "README.md"})
#: The Hub ids of cladapt's base-model aliases (the default is the dequantised Q4_1 GGUF of this model).
KNOWN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_hub_id(name: str) -> bool:
    """True for ``org/name`` (never a path that exists here, never ``./x`` or ``/x``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not Path(name).expanduser().exists()


def hub_base_id(local_id: str, override: str | None = None, *, what: str = "a version") -> str:
    """The base model's Hub id for a card and ``adapter_config.json``.

    ``override`` wins (the user knows what a local folder is); cladapt's aliases map to their real
    model; a Hub id is itself. A local path is refused: vLLM's resolvers compare
    ``base_model_name_or_path`` with the served model's name, so a path would make it unservable.
    """
    if override:
        if not is_hub_id(override):
            raise RegistryError(f"--base-model-id {override!r} is not a Hub id", hint="write it as org/name")
        return override
    if local_id in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[local_id]
    if is_hub_id(local_id):
        return local_id
    raise RegistryError(
        f"{what} was trained on the local base model {local_id!r}, which has no Hub id",
        hint="pass --base-model-id ORG/NAME (the Hub id of that model) so the card and adapter_config.json name it",
    )


def folder_for(ref: AdapterRef) -> str:
    """The version folder in a registry repo: the PEFT adapter name (``amazon__v3``)."""
    return ref.peft_name


def repo_path(folder: str, version_relpath: str) -> str:
    """Where a version file (``adapter/x``, ``sidecars/x``, ``manifest.json``, ``evals/x``) goes in the repo."""
    head, _, rest = version_relpath.partition("/")
    if head == "adapter":
        rel = rest
    elif version_relpath == "manifest.json":
        rel = "cladapt/manifest.json"
    elif head in ("sidecars", "evals"):
        rel = f"cladapt/{version_relpath}"
    else:
        raise RegistryError(f"unexpected file {version_relpath!r} in a version")
    return f"{folder}/{rel}" if folder else rel


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob: what the Hub reports as ``blob_id`` for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_repo_path(path: str) -> str | None:
    """Why a path listed by a repo must not be imported (None if it is fine)."""
    if path == ".gitattributes":
        return None
    try:
        validate_relpath(path, what="repo path")
    except RegistryError as exc:
        return exc.message
    if Path(path).suffix.lower() in FORBIDDEN_SUFFIXES:
        return f"{path}: {Path(path).suffix} files can hold pickles (code that runs on load); only safetensors and JSON are imported"
    return None


class HubFile(BaseModel):
    """One pushed file: its sha256 and size as pushed, and (for version files) its path in the version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    source: str | None = None  # "adapter/adapter_model.safetensors", "manifest.json", ... ; None for shared files

    @field_validator("source")
    @classmethod
    def _safe_source(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                validate_relpath(value)
            except RegistryError as exc:
                raise ValueError(exc.message) from exc
        return value


class HubVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str
    folder: str
    status: Literal["active", "candidate", "rejected", "archived"]
    base_model_id: str
    files: dict[str, HubFile]

    @property
    def aref(self) -> AdapterRef:
        return AdapterRef.parse(self.ref)


class HubShared(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    key: str
    files: dict[str, HubFile]

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        try:
            return validate_name(value, what="shared-state kind")
        except RegistryError as exc:
            raise ValueError(exc.message) from exc

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        try:
            return validate_shared_key(value)
        except RegistryError as exc:
            raise ValueError(exc.message) from exc


class HubIndex(BaseModel):
    """``cladapt-hub.json``: what a pull trusts. Every path is checked before anything is fetched."""

    model_config = ConfigDict(extra="forbid")

    format: int = INDEX_FORMAT
    kind: Literal["registry", "version"]
    cladapt_version: str
    versions: list[HubVersion]
    shared: list[HubShared] = Field(default_factory=list)
    policy: HubFile | None = None

    @field_validator("format")
    @classmethod
    def _known(cls, value: int) -> int:
        if value > INDEX_FORMAT:
            raise ValueError(f"format {value} is newer than this cladapt understands ({INDEX_FORMAT}); upgrade cladapt")
        return value

    def all_files(self) -> dict[str, HubFile]:
        files: dict[str, HubFile] = {}
        for group in [v.files for v in self.versions] + [s.files for s in self.shared]:
            files.update(group)
        if self.policy is not None:
            files["policy.json"] = self.policy
        return files

    def problems(self) -> list[str]:
        """Unsafe paths, versions in the wrong folder, duplicates: everything wrong, at once."""
        out: list[str] = []
        seen: set[str] = set()
        for version in self.versions:
            try:
                expected = "" if self.kind == "version" else folder_for(version.aref)
            except RegistryError as exc:
                out.append(exc.message)
                continue
            if version.folder != expected:
                out.append(f"{version.ref} is stored in folder {version.folder!r}, expected {expected!r}")
            if "manifest.json" not in {f.source for f in version.files.values()}:
                out.append(f"{version.ref}: the index lists no manifest.json")
            for path, entry in version.files.items():
                if entry.source is None or repo_path(version.folder, entry.source) != path:
                    out.append(f"{version.ref}: {path!r} does not match its source {entry.source!r}")
        for shared in self.shared:
            prefix = f"shared/{shared.kind}/{shared.key}/"
            out += [f"shared {shared.kind}/{shared.key}: {p!r} is outside {prefix}" for p in shared.files if not p.startswith(prefix) or "/" in p[len(prefix):]]
        for group in [list(v.files) for v in self.versions] + [list(s.files) for s in self.shared]:
            for path in group:
                if path in seen:
                    out.append(f"{path!r} is listed twice")
                seen.add(path)
                if (why := check_repo_path(path)) is not None:
                    out.append(why)
        return out


def parse_index(data: bytes, where: str) -> HubIndex:
    """Validate ``cladapt-hub.json``; IntegrityError lists every problem."""
    try:
        index = HubIndex.model_validate(json.loads(data))
    except ValueError as exc:  # JSON or pydantic
        detail = "; ".join(format_validation_error(exc)) if isinstance(exc, ValidationError) else str(exc)
        raise IntegrityError(f"{where}: invalid {INDEX_FILE}: {detail}", hint="nothing was imported; the repo was not pushed by cladapt, or was edited") from exc
    problems = index.problems()
    if problems:
        raise IntegrityError(f"{where}: {INDEX_FILE} is unsafe or inconsistent:\n  - " + "\n  - ".join(problems),
                             hint="nothing was imported; the repo was edited by hand or is hostile")
    return index


@dataclass(frozen=True)
class Upload:
    """One file a push writes: where it goes, and its bytes or a local file."""

    path: str
    sha256: str
    size: int
    data: bytes | None = None
    source: Path | None = None

    def read(self) -> bytes:
        return self.data if self.data is not None else self.source.read_bytes()  # type: ignore[union-attr]


def hub_adapter_config(raw: bytes, base_id: str) -> bytes:
    """``adapter_config.json`` with ``base_model_name_or_path`` set to the Hub id (and nothing else changed)."""
    try:
        config: dict[str, Any] = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"adapter_config.json is not valid JSON ({exc})") from exc
    config["base_model_name_or_path"] = base_id
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
