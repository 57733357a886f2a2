"""What a registry holds besides the versions themselves: evaluations attached after commit, the
admission policy, the audit log, and state shared by tasks (``shared/<kind>/<key>/``).

A mixin of :class:`cladapt.registry.store.Store`, kept apart so the store module is about versions
(commit, status, listing) and this one about the mutable annotations around them. Every write takes
the store's lock and is audited, like a commit.

Evaluations and the policy are stored *sealed*: ``{"cladapt_checksum": sha256, "payload": {...}}``,
so a damaged byte is caught when they are read and by ``registry verify``; files written before
sealing existed are read as they are (and ``verify`` counts them as not covered).
"""

from __future__ import annotations

import builtins
import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import IntegrityError, RegistryError
from cladapt.registry import audit
from cladapt.registry.fsio import atomic_write_bytes, dumps_json, fsync_dir, read_nofollow, refuse_symlinks
from cladapt.registry.lock import Claim, claim_path
from cladapt.registry.refs import AdapterRef, validate_name, validate_shared_key
from cladapt.registry.staging import publish_shared, read_shared_dir, stage_shared
from cladapt.registry.status import SEAL_KEY, seal_json, unseal_json

if TYPE_CHECKING:
    from cladapt.registry.lock import StoreLock
    from cladapt.registry.manifest import VersionRecord


class StoreAnnotations:
    """Evaluations, policy, audit log and shared state of a :class:`~cladapt.registry.store.Store`."""

    if TYPE_CHECKING:  # provided by Store
        root: Path
        work_dir: Path
        _lock: StoreLock
        _audit_path: Path

        def get(self, ref: AdapterRef | str, *, base_fingerprint: str | None = None) -> VersionRecord: ...

        def _audit(self, action: str, ref: str | None, from_: Any, to: Any, reason: str, *, actor: str,
                   **extra: Any) -> None: ...

        def _refuse_links(self) -> None: ...

    def evaluations(self, ref: AdapterRef | str) -> dict[str, dict[str, Any]]:
        """Evaluation results attached after commit (``evals/<name>.json``), by name."""
        rec = self.get(ref)
        results: dict[str, dict[str, Any]] = {}
        evals = refuse_symlinks(self.root, rec.path / "evals")
        for path in sorted(evals.glob("*.json")) if evals.is_dir() else []:
            try:
                results[path.stem] = unseal_json(read_nofollow(path), f"{rec.ref}: evaluation {path.name!r}")[0]
            except OSError as exc:
                raise IntegrityError(f"{rec.ref}: evaluation {path.name!r} is unreadable ({exc})") from exc
        return results

    def audit_log(self) -> builtins.list[dict[str, Any]]:
        """Every audit event, oldest first (torn lines are skipped with a warning)."""
        return audit.read_events(self._audit_path)[0]

    def get_policy(self) -> dict[str, Any] | None:
        """The stored admission policy, or None."""
        path = self.root / "policy.json"
        hint = "set it again with `cladapt gate set ...`, or remove it with `cladapt gate clear`"
        try:
            return unseal_json(read_nofollow(path), f"{path}: the policy")[0]
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IntegrityError(f"{path}: unreadable policy ({exc})", hint=hint) from exc
        except IntegrityError as exc:
            raise IntegrityError(exc.message, hint=hint) from exc

    def add_evaluation(self, ref: AdapterRef | str, name: str, payload: dict[str, Any], *, actor: str = "cladapt") -> None:
        """Attach (or replace) ``evals/<name>.json``: a mutable annotation, not part of the manifest."""
        validate_name(name, what="evaluation name")
        data = _json_object_bytes(payload, f"evaluation {name!r}")
        with self._lock:
            self._refuse_links()
            rec = self.get(ref)
            evals = refuse_symlinks(self.root, rec.path / "evals")
            if not evals.is_dir():
                evals.mkdir()
                fsync_dir(rec.path)
            atomic_write_bytes(evals / f"{name}.json", data)
            self._audit("evaluate", str(rec.ref), None, None, name, actor=actor)

    def set_policy(self, policy: dict[str, Any], *, actor: str = "cladapt", reason: str = "") -> None:
        """Replace ``policy.json`` atomically; audited with the old and new policy."""
        data = _json_object_bytes(policy, "the policy")
        with self._lock:
            self._refuse_links()
            old = self.get_policy()
            atomic_write_bytes(self.root / "policy.json", data)
            self._audit("policy", None, old, policy, reason, actor=actor)

    def shared_dir(self, kind: str, key: str) -> Path:
        """``<root>/shared/<kind>/<key>/`` (not created): state shared by tasks, e.g. replay statistics."""
        path = self.root / "shared" / validate_name(kind, what="shared-state kind") / validate_shared_key(key)
        return refuse_symlinks(self.root, path)

    def write_shared(self, kind: str, key: str, files: dict[str, Path], *, actor: str = "cladapt") -> Path:
        """Store ``files`` (name -> source path) as the shared state ``kind/key``, replacing any old one.

        Files are copied and hashed into ``.work`` first (no lock); under the lock the new folder
        replaces the old one by two renames, which readers and later writers can recover from.
        """
        target = self.shared_dir(kind, key)
        tmp = refuse_symlinks(self.root, self.work_dir / "staging") / f"shared-{uuid.uuid4().hex}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        claim = Claim.take(claim_path(tmp))  # `registry gc` leaves a claimed folder alone
        try:
            stage_shared(tmp, files)
            with self._lock:
                self._refuse_links()
                replaced = publish_shared(tmp, target)
                self._audit("write-shared", f"{kind}/{key}", None, sorted(files), "replaced" if replaced else "created", actor=actor)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if claim is not None:
                claim.release(remove=True)
        return target

    def shared_keys(self, kind: str) -> builtins.list[str]:
        """The keys of every shared state of ``kind`` written so far (sorted; leftovers of a replace skipped)."""
        folder = refuse_symlinks(self.root, self.root / "shared" / validate_name(kind, what="shared-state kind"))
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []
        return [key for key in names if self.read_shared(kind, key) is not None]

    def read_shared(self, kind: str, key: str) -> Path | None:
        """The verified shared-state folder ``kind/key``, or None if it was never written.

        Raises:
            IntegrityError: a file does not match the sha256 recorded when it was written.
        """
        return read_shared_dir(self.shared_dir(kind, key), f"{kind}/{key}")


def _json_object_bytes(obj: Any, what: str) -> bytes:
    """``obj`` as sealed JSON bytes, or a RegistryError naming ``what`` when it is not a
    JSON-serialisable dict."""
    if not isinstance(obj, dict):
        raise RegistryError(f"{what} must be a dict, got {type(obj).__name__}")
    try:
        data = dumps_json(obj)
        plain = json.loads(json.dumps(obj))  # the payload as a reader will see it
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} is not JSON-serialisable: {exc}") from exc
    if SEAL_KEY in plain:  # the stored form of an annotation (e.g. copied from another registry)
        plain = unseal_json(data, what)[0]
    return seal_json(plain)
