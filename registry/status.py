"""``tasks/<task>/status.json`` (which version has which status) and the registry's checksummed JSON.

Status changes over time, so it is not in the immutable manifest but in one small file per task,
replaced atomically. Format 2 carries a checksum over its content, the sha256 of every version's
``manifest.json`` and the audit events it still owes the log. The same canonical-JSON checksum
seals evaluations and the policy (:func:`seal_json`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cladapt.errors import IntegrityError, RegistryError
from cladapt.registry.fsio import atomic_write_bytes, dumps_json, read_nofollow, sha256_bytes

Status = Literal["active", "candidate", "rejected", "archived"]
STATUSES: tuple[str, ...] = ("active", "candidate", "rejected", "archived")


# --------------------------------------------------------------------------------------------
# status.json: version -> status, plus a generation counter and the version high-water mark.


@dataclass
class TaskStatus:
    """Contents of ``tasks/<task>/status.json``.

    ``generation`` increases on every change, so a reader can tell cheaply whether the index is
    stale. ``last_version`` is the highest number ever allocated: version numbers are never reused,
    even after a remove, because refs like ``amazon@3`` appear in audit logs and caches.
    ``manifests`` holds the sha256 of each version's ``manifest.json`` (the manifest lists every
    other file's sha256, so this closes the chain). ``owed_audit`` holds audit events written here
    *before* they reach the audit log: a process killed in between leaves them for the next one to
    append (:meth:`Store.open`). The file carries a ``checksum`` over the rest (format 2).
    """

    generation: int = 0
    last_version: int = 0
    versions: dict[int, str] = field(default_factory=dict)
    manifests: dict[int, str] = field(default_factory=dict)
    owed_audit: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": STATUS_FORMAT,
            "generation": self.generation,
            "last_version": self.last_version,
            "versions": {str(v): s for v, s in sorted(self.versions.items())},
            "manifests": {str(v): d for v, d in sorted(self.manifests.items())},
            "owed_audit": self.owed_audit,
        }
        return {**body, "checksum": json_checksum(body)}


STATUS_FORMAT = 2
_HEX64 = re.compile(r"[0-9a-f]{64}")


def json_checksum(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces): survives re-indenting."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())


def load_task_status(path: Path) -> TaskStatus:
    """Read ``status.json``; a missing file is an empty task.

    Raises:
        IntegrityError: the file is malformed, a link, or (format 2) does not match its checksum.
    """
    hint = "run `cladapt registry verify --reindex`"
    try:
        raw = json.loads(read_nofollow(path))
    except FileNotFoundError:
        return TaskStatus()
    except (OSError, ValueError, RegistryError) as exc:
        detail = exc.message if isinstance(exc, RegistryError) else str(exc)
        raise IntegrityError(f"{path}: unreadable status file ({detail})", hint=hint) from exc
    try:
        fmt = raw.get("format", 1)
        if fmt == STATUS_FORMAT or "checksum" in raw:
            body = {k: v for k, v in raw.items() if k != "checksum"}
            if raw.get("checksum") != json_checksum(body):
                raise IntegrityError(f"{path}: status file does not match its checksum (damaged or edited)", hint=hint)
        elif fmt != 1:
            raise IntegrityError(f"{path}: unknown status file format {fmt!r}", hint=hint)
        versions = {int(v): str(s) for v, s in raw["versions"].items()}
        manifests = {int(v): str(d) for v, d in raw.get("manifests", {}).items()}
        owed = list(raw.get("owed_audit", []))
        status = TaskStatus(int(raw["generation"]), int(raw.get("last_version", 0)), versions, manifests, owed)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"{path}: malformed status file", hint=hint) from exc
    bad = {v: s for v, s in status.versions.items() if s not in STATUSES}
    if bad:
        raise IntegrityError(f"{path}: unknown status values {bad}", hint=f"statuses are {', '.join(STATUSES)}")
    if not all(isinstance(e, dict) for e in owed) or not all(_HEX64.fullmatch(d) for d in manifests.values()):
        raise IntegrityError(f"{path}: malformed status file", hint=hint)
    return status


def save_task_status(path: Path, status: TaskStatus) -> None:
    """Atomically replace ``status.json`` (format 2, with its checksum)."""
    atomic_write_bytes(path, dumps_json(status.to_json()))


# --------------------------------------------------------------------------------------------
# Sealed JSON: evaluations and the policy carry the sha256 of their own payload.

SEAL_KEY = "cladapt_checksum"


def seal_json(payload: dict[str, Any]) -> bytes:
    """``{"cladapt_checksum": sha256, "payload": payload}`` as the registry's JSON bytes."""
    return dumps_json({SEAL_KEY: json_checksum(payload), "payload": payload})


def unseal_json(data: bytes, what: str) -> tuple[dict[str, Any], bool]:
    """The payload of sealed JSON bytes, checked, and whether it was sealed (files written before
    sealing existed are plain objects and returned as they are, unchecked).

    Raises:
        IntegrityError: not a JSON object, or the payload does not match its checksum.
    """
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise IntegrityError(f"{what} is not valid JSON ({exc})", hint="it was damaged; write it again") from exc
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what} is not a JSON object", hint="it was damaged; write it again")
    if SEAL_KEY not in obj and not ("payload" in obj and len(obj) == 2):
        return obj, False  # written before sealing (a damaged seal key still has "payload" beside one key)
    payload = obj.get("payload")
    if set(obj) != {SEAL_KEY, "payload"} or not isinstance(payload, dict) or obj[SEAL_KEY] != json_checksum(payload):
        raise IntegrityError(f"{what} does not match its checksum (damaged or edited)", hint="it was damaged; write it again")
    return payload, True
