"""Push versions and whole registries to the Hugging Face Hub, and pull them back (``hub_pull``).

The Hub is a sync target, not a storage backend: the registry on disk stays the single source of
truth, and a repo is a verifiable copy of it (layout: :mod:`cladapt.registry.hub_layout`).

A push is one ``create_commit`` with ``parent_commit`` set to the head it compared against, so a
concurrent push makes it fail cleanly (HTTP 412) with nothing half-written. Files whose bytes are
already in the repo are not uploaded again; files cladapt manages that no longer exist locally are
deleted in the same commit (the repo's history keeps them). ``dry_run`` reports all of this and
writes nothing.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cladapt.errors import IntegrityError, RegistryError
from cladapt.registry.cards import CardVersion, registry_card, version_card
from cladapt.registry.fsio import dumps_json, sha256_bytes
from cladapt.registry.hub_client import hub_errors, make_api, remote_tree
from cladapt.registry.hub_layout import (
    INDEX_FILE,
    HubFile,
    HubIndex,
    HubShared,
    HubVersion,
    Upload,
    folder_for,
    git_blob_sha1,
    hub_adapter_config,
    hub_base_id,
    repo_path,
)
from cladapt.registry.hub_pull import PullResult, pull
from cladapt.registry.manifest import unlisted_files, verify_entries
from cladapt.registry.refs import validate_name, validate_shared_key

if TYPE_CHECKING:
    from cladapt.registry.manifest import VersionRecord
    from cladapt.registry.store import Store

__all__ = ["PullResult", "PushResult", "plan_push", "pull", "push"]

logger = logging.getLogger(__name__)
_VERSION_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}__v[1-9][0-9]{0,8}")


@dataclass
class PushResult:
    """What a push did (or, with ``dry_run``, would do)."""

    repo_id: str
    revision: str
    versions: list[str]
    uploads: list[Upload]
    deletes: list[str]
    unchanged: list[str]
    commit: str | None = None
    url: str | None = None
    tag: str | None = None
    dry_run: bool = False
    files: list[Upload] = field(default_factory=list, repr=False)


def _version_uploads(store: Store, rec: VersionRecord, folder: str, base_id: str, repo_id: str) -> tuple[list[Upload], CardVersion]:
    """Every file of one version as pushed, after checking the registry copy is intact."""
    verify_entries(rec.path, list(rec.manifest.files), rec.ref)
    extra = [p for p in unlisted_files(rec.path, rec.manifest) if not p.startswith("evals/")]
    if extra:
        raise IntegrityError(f"{rec.ref}: unlisted file(s) {extra}; refusing to publish them", hint="run `cladapt registry verify`")
    evals_dir = rec.path / "evals"
    eval_files = sorted(p for p in evals_dir.glob("*.json")) if evals_dir.is_dir() else []
    card = CardVersion(rec.manifest, rec.status, base_id, folder, store.evaluations(rec.ref))
    uploads: list[Upload] = []

    def add(source: str, data: bytes | None = None, path: Path | None = None, sha: str | None = None, size: int | None = None) -> None:
        if data is not None:
            sha, size = sha256_bytes(data), len(data)
        uploads.append(Upload(repo_path(folder, source), sha, size, data=data, source=path))  # type: ignore[arg-type]

    for entry in rec.manifest.files:
        if entry.path == "adapter/README.md":
            continue  # replaced by cladapt's card below
        if entry.path == "adapter/adapter_config.json":
            add(entry.path, hub_adapter_config((rec.path / entry.path).read_bytes(), base_id))
        else:
            add(entry.path, path=rec.path / entry.path, sha=entry.sha256, size=entry.size)
    add("adapter/README.md", version_card(card, repo_id).encode())
    add("manifest.json", (rec.path / "manifest.json").read_bytes())
    for path in eval_files:
        if path.is_symlink() or not path.is_file():
            raise IntegrityError(f"{rec.ref}: evaluation {path.name} is not a regular file; refusing to publish it")
        data = path.read_bytes()
        try:
            json.loads(data)
        except ValueError as exc:
            raise IntegrityError(f"{rec.ref}: evaluation {path.name} is not valid JSON ({exc})", hint="run `cladapt registry verify`") from exc
        add(f"evals/{path.name}", data)
    return uploads, card


def _shared_uploads(store: Store) -> tuple[list[Upload], list[HubShared]]:
    """Every shared-state folder (verified against its own manifest first)."""
    uploads: list[Upload] = []
    listing: list[HubShared] = []
    root = store.root / "shared"
    for kind_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for key_dir in sorted(p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            kind, key = validate_name(kind_dir.name, what="shared-state kind"), validate_shared_key(key_dir.name)
            folder = store.read_shared(kind, key)
            if folder is None:
                continue
            files: dict[str, HubFile] = {}
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                data = path.read_bytes()
                rp = f"shared/{kind}/{key}/{path.name}"
                uploads.append(Upload(rp, sha256_bytes(data), len(data), data=data))
                files[rp] = HubFile(sha256=sha256_bytes(data), size=len(data))
            listing.append(HubShared(kind=kind, key=key, files=files))
    return uploads, listing


def plan_push(store: Store, repo_id: str, ref: str | None = None, *, base_model_id: str | None = None) -> tuple[list[Upload], list[str]]:
    """All files of a push (one version at the repo root when ``ref`` is given, else the registry)."""
    from cladapt import __version__

    recs = [store.get(ref)] if ref else store.list()
    if not recs:
        raise RegistryError(f"the registry at {store.root} has no versions to push", hint="train one first")
    uploads: list[Upload] = []
    versions: list[HubVersion] = []
    cards: list[CardVersion] = []
    for rec in recs:
        folder = "" if ref else folder_for(rec.ref)
        base_id = hub_base_id(str(rec.manifest.base_model["id"]), base_model_id, what=str(rec.ref))
        files, card = _version_uploads(store, rec, folder, base_id, repo_id)
        uploads += files
        cards.append(card)
        versions.append(HubVersion(ref=str(rec.ref), folder=folder, status=rec.status, base_model_id=base_id,
                                   files={u.path: HubFile(sha256=u.sha256, size=u.size, source=_source_of(u.path, folder)) for u in files}))
    shared: list[HubShared] = []
    policy_file: HubFile | None = None
    if not ref:
        shared_uploads, shared = _shared_uploads(store)
        uploads += shared_uploads
        policy = store.get_policy()
        if policy is not None:
            data = dumps_json(policy)
            uploads.append(Upload("policy.json", sha256_bytes(data), len(data), data=data))
            policy_file = HubFile(sha256=sha256_bytes(data), size=len(data))
        card_text = registry_card(cards, repo_id, shared=[f"{s.kind}/{s.key}" for s in shared], has_policy=policy is not None)
        uploads.append(Upload("README.md", sha256_bytes(card_text.encode()), len(card_text.encode()), data=card_text.encode()))
    index = HubIndex(kind="version" if ref else "registry", cladapt_version=__version__, versions=versions,
                     shared=shared, policy=policy_file)
    index_bytes = (index.model_dump_json(indent=2) + "\n").encode()
    uploads.append(Upload(INDEX_FILE, sha256_bytes(index_bytes), len(index_bytes), data=index_bytes))
    return uploads, [str(r.ref) for r in recs]


def _source_of(path: str, folder: str) -> str:
    """Inverse of :func:`repo_path` for the files a push adds (card, manifest, evaluations)."""
    rel = path[len(folder) + 1:] if folder else path
    if rel.startswith("cladapt/"):
        return rel[len("cladapt/"):]
    return f"adapter/{rel}"


def _managed(path: str) -> bool:
    """Files a push may delete: those cladapt writes (a user's LICENSE or .gitattributes stay)."""
    head = path.split("/")[0]
    return (
        path in (INDEX_FILE, "policy.json", "README.md", "adapter_config.json", "adapter_model.safetensors")
        or head in ("shared", "cladapt")
        or (_VERSION_FOLDER.fullmatch(head) is not None and "/" in path)
    )


def _diff(uploads: list[Upload], remote: dict[str, tuple[str, str | None, int]]) -> tuple[list[Upload], list[str], list[str]]:
    changed, unchanged = [], []
    for up in uploads:
        have = remote.get(up.path)
        if have is not None and (have[1] == up.sha256 or (have[1] is None and have[0] == git_blob_sha1(up.read()))):
            unchanged.append(up.path)
        else:
            changed.append(up)
    wanted = {u.path for u in uploads}
    deletes = sorted(p for p in remote if p not in wanted and _managed(p))
    return changed, deletes, unchanged


def push(
    store: Store,
    repo_id: str,
    ref: str | None = None,
    *,
    private: bool | None = None,
    revision: str = "main",
    tag: str | None = None,
    base_model_id: str | None = None,
    message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Push one version (``ref``: a plain PEFT repo at the root plus its card) or the whole registry.

    Raises:
        RegistryError: a version's base model has no Hub id (pass ``base_model_id``), or the Hub refused.
        IntegrityError: a local file does not match its manifest (nothing is pushed).
        Conflict: the repo moved on while pushing (HTTP 412), or ``tag`` exists.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    uploads, refs = plan_push(store, repo_id, ref, base_model_id=base_model_id)
    api = make_api(token, endpoint)
    result = PushResult(repo_id, revision, refs, [], [], [], tag=tag, dry_run=dry_run, files=uploads)
    with hub_errors(api, repo_id, "push"):
        if not dry_run:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        try:
            head = api.repo_info(repo_id, revision=revision).sha
            remote = remote_tree(api, repo_id, head)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            if not dry_run:
                raise
            head, remote = None, {}
        result.uploads, result.deletes, result.unchanged = _diff(uploads, remote)
        if dry_run:
            return result
        ops = [CommitOperationAdd(u.path, u.data if u.data is not None else str(u.source)) for u in result.uploads]
        ops += [CommitOperationDelete(p) for p in result.deletes]
        if ops:
            what = ref or f"{len(refs)} versions"
            info = api.create_commit(repo_id, ops, commit_message=message or f"cladapt push: {what}",
                                     revision=revision, parent_commit=head)
            result.commit, result.url = info.oid, info.commit_url
        else:
            result.commit = head
            logger.info("%s@%s is already up to date", repo_id, revision)
        if tag:
            api.create_tag(repo_id, tag=tag, revision=result.commit, tag_message=f"cladapt push {ref or 'registry'}")
    logger.info("pushed %s to %s@%s (%d uploaded, %d deleted, %d unchanged)", ", ".join(refs), repo_id, revision,
                len(result.uploads), len(result.deletes), len(result.unchanged))
    return result

