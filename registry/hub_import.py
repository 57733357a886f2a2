"""The last step of a pull: verified files -> staged versions -> commits, then shared state and policy.

Every version is staged (no lock) before the first commit, so the window in which a killed pull
can leave a partial import is the few milliseconds of the commits themselves; each commit is
atomic, lineage-ordered (parents first), and a re-run imports only what is still missing.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import IntegrityError
from cladapt.registry.fsio import sha256_file
from cladapt.registry.hub_layout import HubShared
from cladapt.registry.manifest import Manifest

if TYPE_CHECKING:
    from cladapt.registry.hub_pull import PulledVersion, _Candidate
    from cladapt.registry.staging import Staging
    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)
ACTOR = "cladapt pull"


def manifest_fields(manifest: Manifest) -> dict[str, Any]:
    """The fields a staging carries: everything but what :meth:`Store.commit` fills in itself."""
    return manifest.model_dump(mode="json", exclude={"task", "version", "files", "created", "schema_version"})


def remap_parents(parents: list[str], mapping: dict[str, str]) -> tuple[list[str], list[str]]:
    """(local refs of the parents the mapping knows, parents it does not know)."""
    return [mapping[p] for p in parents if p in mapping], [p for p in parents if p not in mapping]


def _stage(store: Store, cand: _Candidate, root: Path) -> Staging:
    staging = store.stage(cand.manifest.task)
    for path, entry in cand.entry.files.items():
        source = str(entry.source)
        if source == "manifest.json" or source.startswith("evals/"):
            continue
        target = staging.dir / source
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / path, target)
    return staging


def commit_imports(store: Store, root: Path, plan: list[tuple[_Candidate, str]], present: dict[str, str],
                   repo_id: str, commit: str) -> list[PulledVersion]:
    """Stage every planned version, then commit them in order; returns what was imported."""
    from cladapt.registry.hub_pull import PulledVersion

    staged: list[tuple[_Candidate, str, Staging]] = []
    out: list[PulledVersion] = []
    mapping = dict(present)
    try:
        for cand, status in plan:
            staged.append((cand, status, _stage(store, cand, root)))
        for cand, status, staging in staged:
            parents, dropped = remap_parents(cand.manifest.parents, mapping)
            staging.manifest_fields = {**manifest_fields(cand.manifest), "parents": parents}
            reason = f"pulled from {repo_id}@{commit[:12]} where it is {cand.entry.ref} (created {cand.manifest.created})"
            if cand.manifest.parents:
                reason += f"; original parents {', '.join(cand.manifest.parents)}"
            if dropped:
                reason += f"; not in the repo, so left out of lineage: {', '.join(dropped)}"
            rec = store.commit(staging, status=status, reason=reason, actor=ACTOR)
            mapping[cand.entry.ref] = str(rec.ref)
            _import_evals(store, root, cand, str(rec.ref))
            why = "renumbered: the local task already uses that number" if str(rec.ref) != cand.entry.ref else ""
            if dropped:
                why = "; ".join(filter(None, [why, f"parents not in the repo: {', '.join(dropped)}"]))
            if status != cand.entry.status:
                why = "; ".join(filter(None, [why, f"{cand.entry.status} in the repo, imported as {status} (local history diverges)"]))
            out.append(PulledVersion(cand.entry.ref, str(rec.ref), "imported", status, why))
    finally:
        for _, _, staging in staged:
            staging.discard()  # a no-op for committed ones
    return out


def _import_evals(store: Store, root: Path, cand: _Candidate, local_ref: str) -> None:
    for path, entry in sorted(cand.entry.files.items()):
        source = str(entry.source)
        if not source.startswith("evals/"):
            continue
        try:
            payload = json.loads((root / path).read_bytes())
        except ValueError as exc:
            raise IntegrityError(f"{path}: evaluation is not valid JSON ({exc})") from exc
        store.add_evaluation(local_ref, Path(source).stem, payload, actor=ACTOR)


def import_shared(store: Store, root: Path, shared: list[HubShared]) -> list[str]:
    """Add shared state the registry lacks; never replace a different local copy (say so instead)."""
    notes: list[str] = []
    for item in shared:
        label = f"{item.kind}/{item.key}"
        files = {Path(p).name: root / p for p in item.files if Path(p).name != "manifest.json"}
        _check_shared_manifest(root / f"shared/{item.kind}/{item.key}/manifest.json", files, label)
        local = store.read_shared(item.kind, item.key)
        if local is None:
            store.write_shared(item.kind, item.key, files, actor=ACTOR)
            notes.append(f"shared state {label}: imported")
            continue
        same = {p.name: sha256_file(p) for p in local.iterdir() if p.is_file() and p.name != "manifest.json"} == {
            n: sha256_file(p) for n, p in files.items()}
        notes.append(f"shared state {label}: " + ("already present" if same else "differs locally; kept the local copy"))
    return notes


def _check_shared_manifest(path: Path, files: dict[str, Path], label: str) -> None:
    try:
        listing = json.loads(path.read_bytes())["files"]
        expected = {name: (str(meta["sha256"]), int(meta["size"])) for name, meta in listing.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"shared state {label}: unreadable manifest.json ({exc})", hint="nothing of it was imported") from exc
    actual = {name: sha256_file(p) for name, p in files.items()}
    if actual != expected:
        raise IntegrityError(f"shared state {label}: files do not match its manifest.json", hint="nothing of it was imported")


def import_policy(store: Store, root: Path, repo_id: str) -> list[str]:
    """Adopt the repo's admission policy when the registry has none; never overwrite a local one."""
    try:
        policy = json.loads((root / "policy.json").read_bytes())
    except ValueError as exc:
        raise IntegrityError(f"{repo_id}: policy.json is not valid JSON ({exc})") from exc
    local = store.get_policy()
    if local is None:
        store.set_policy(policy, actor=ACTOR, reason=f"pulled from {repo_id}")
        return ["policy: imported"]
    return ["policy: already the same" if local == policy else "policy: differs locally; kept the local one"]
