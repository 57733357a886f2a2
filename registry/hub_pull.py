"""Pull a cladapt repo (one version or a whole registry) or any plain PEFT LoRA repo into a registry.

Nothing is trusted before it is checked, and nothing reaches the registry before everything is:

1. the revision is pinned to one commit sha, and the repo's file list is checked first: only safe
   relative paths, no pickle formats anywhere, every file the index lists present, no unlisted file
   in a version or shared folder;
2. the selected files are downloaded into the registry's own ``.work`` and each one's sha256 is
   checked against ``cladapt-hub.json`` and (except the two files a push rewrites) against the
   version's own manifest; the manifests are validated;
3. each version is staged through :meth:`Store.stage` and, only when all are staged, committed in
   lineage order through :meth:`Store.commit` (each commit is atomic; parents are remapped to local
   version numbers and the original refs go to the audit log).

A pull killed before step 3 leaves only ``.work`` debris. Versions already present (same files,
whatever their local number) are not imported again. A task whose local history holds versions the
repo does not have has *diverged*: the pull is refused, or with ``on_diverge="append"`` the repo's
new versions are imported after the local ones as candidates, so the local active version stays.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cladapt.errors import Conflict, IncompatibleBaseModel, IntegrityError, UsageError
from cladapt.registry.fsio import sha256_file
from cladapt.registry.hub_client import download, hub_errors, make_api, remote_tree
from cladapt.registry.hub_layout import INDEX_FILE, REWRITTEN, HubIndex, HubVersion, check_repo_path, parse_index
from cladapt.registry.hub_peft import import_peft
from cladapt.registry.manifest import Manifest, format_validation_error

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)
OnDiverge = Literal["refuse", "append"]


@dataclass
class PulledVersion:
    """One version of the repo and what the pull did with it."""

    remote: str
    local: str | None
    action: Literal["imported", "present"]
    status: str | None = None
    reason: str = ""


@dataclass
class PullResult:
    repo_id: str
    commit: str
    kind: str  # "registry", "version" or "peft"
    versions: list[PulledVersion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def imported(self) -> list[PulledVersion]:
        return [v for v in self.versions if v.action == "imported"]


@dataclass
class _Candidate:
    entry: HubVersion
    manifest: Manifest
    key: frozenset[tuple[str, str]]


def content_key(manifest: Manifest) -> frozenset[tuple[str, str]]:
    """What makes two versions the same version: every file's sha256 except those a push rewrites."""
    return frozenset((e.path, e.sha256) for e in manifest.files if e.path not in REWRITTEN)


def pull(
    store: Store,
    repo_id: str,
    *,
    revision: str | None = None,
    tasks: list[str] | None = None,
    on_diverge: OnDiverge = "refuse",
    base_model: str | None = None,
    base_model_id: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PullResult:
    """Import ``repo_id`` at ``revision`` (branch, tag or sha; default main) into ``store``.

    A cladapt repo (it has ``cladapt-hub.json``) brings its versions with lineage, CL state,
    evaluations, shared state and policy; ``tasks`` limits it to those tasks and their ancestors.
    Any other repo must be a PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``,
    optionally in ``subfolder``) and becomes the next version of ``tasks[0]``.

    Raises:
        IntegrityError: a file is missing, unlisted, unsafe or differs from its sha256 (nothing imported).
        IncompatibleBaseModel: the adapters were made for another base model than ``base_model``.
        Conflict: a task's local history diverges and ``on_diverge`` is "refuse".
    """
    api = make_api(token, endpoint)
    work = store.work_dir / "staging" / f"pull-{uuid.uuid4().hex}"
    try:
        with hub_errors(api, repo_id, "pull"):
            commit = api.repo_info(repo_id, revision=revision or "main").sha
            tree = remote_tree(api, repo_id, commit)
            if INDEX_FILE in tree and subfolder is None:
                return _pull_cladapt(store, api, repo_id, commit, tree, work, tasks, on_diverge, base_model)
            if not tasks or len(tasks) != 1:
                raise UsageError(f"{repo_id} is not a cladapt repo (no {INDEX_FILE}), so it is imported as a plain PEFT LoRA",
                                 hint="name the task it becomes a version of: --task NAME")
            imported = import_peft(store, api, repo_id, commit, tree, work, task=tasks[0], subfolder=subfolder,
                                   base_model=base_model, base_model_id=base_model_id)
            result = PullResult(repo_id, commit, "peft")
            result.versions.append(PulledVersion(**imported))
            return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_tree(index: HubIndex, tree: dict[str, tuple[str, str | None, int]], repo_id: str) -> None:
    """Refuse the whole repo if any path is unsafe, a listed file is missing, or a file is unlisted."""
    problems = [why for path in tree if (why := check_repo_path(path)) is not None]
    listed = index.all_files()
    for path, entry in listed.items():
        if path not in tree:
            problems.append(f"{path}: listed in {INDEX_FILE} but missing from the repo")
        elif tree[path][2] != entry.size:
            problems.append(f"{path}: the repo has {tree[path][2]} bytes, {INDEX_FILE} says {entry.size}")
    owned = {v.folder for v in index.versions if v.folder} | {f"shared/{s.kind}/{s.key}" for s in index.shared}
    for path in tree:
        if path in listed or path in (".gitattributes", INDEX_FILE):
            continue
        if index.kind == "version" or any(path.startswith(f"{o}/") for o in owned):
            problems.append(f"{path}: in a version or shared folder but not listed in {INDEX_FILE}")
    if problems:
        raise IntegrityError(f"{repo_id}: refusing to import:\n  - " + "\n  - ".join(sorted(set(problems))),
                             hint="nothing was imported; the repo holds files cladapt did not push, or they are missing")


def _verify_file(root: Path, path: str, sha256: str, size: int, repo_id: str) -> None:
    local = root / path
    if local.is_symlink() or not local.is_file():
        raise IntegrityError(f"{repo_id}: {path} was not downloaded", hint="nothing was imported")
    if sha256_file(local) != (sha256, size):
        raise IntegrityError(f"{repo_id}: {path} does not match its sha256 in {INDEX_FILE} (corrupted or tampered)",
                             hint="nothing was imported; push it again from a registry that passes `cladapt registry verify`")


def _load_manifest(root: Path, entry: HubVersion, repo_id: str) -> Manifest:
    """The version's manifest, validated and cross-checked against the index."""
    path = next(p for p, f in entry.files.items() if f.source == "manifest.json")
    try:
        manifest = Manifest.model_validate_json((root / path).read_bytes())
    except ValueError as exc:
        detail = "; ".join(format_validation_error(exc)) if hasattr(exc, "errors") else str(exc)
        raise IntegrityError(f"{repo_id}: {path} is not a valid manifest: {detail}", hint="nothing was imported") from exc
    if str(manifest.ref) != entry.ref:
        raise IntegrityError(f"{repo_id}: {path} describes {manifest.ref}, the index says {entry.ref}", hint="nothing was imported")
    by_source = {f.source: f for f in entry.files.values()}
    for mf in manifest.files:
        if mf.path in REWRITTEN:
            continue
        pushed = by_source.get(mf.path)
        if pushed is None or (pushed.sha256, pushed.size) != (mf.sha256, mf.size):
            raise IntegrityError(f"{repo_id}: {entry.ref}: {mf.path} differs from the version's manifest", hint="nothing was imported")
    listed = {mf.path for mf in manifest.files} | set(REWRITTEN) | {"manifest.json"}
    extra = [s for s in by_source if s not in listed and not str(s).startswith("evals/")]
    if extra:
        raise IntegrityError(f"{repo_id}: {entry.ref}: files {extra} are not in the version's manifest", hint="nothing was imported")
    return manifest


def _select(index: HubIndex, tasks: list[str] | None, repo_id: str) -> list[HubVersion]:
    """The versions of ``tasks`` plus every ancestor the repo holds (lineage must come along)."""
    by_ref = {v.ref: v for v in index.versions}
    if not tasks:
        return list(index.versions)
    missing = [t for t in tasks if not any(v.aref.task == t for v in index.versions)]
    if missing:
        have = sorted({v.aref.task for v in index.versions})
        raise UsageError(f"{repo_id} has no task {', '.join(missing)}", hint=f"its tasks: {', '.join(have)}")
    return [by_ref[r] for r in sorted({v.ref for v in index.versions if v.aref.task in tasks}) if r in by_ref]


def _close_over_parents(chosen: list[_Candidate], every: dict[str, _Candidate]) -> list[_Candidate]:
    out = {c.entry.ref: c for c in chosen}
    stack = list(chosen)
    while stack:
        for parent in stack.pop().manifest.parents:
            if parent in every and parent not in out:
                out[parent] = every[parent]
                stack.append(every[parent])
    return list(out.values())


def _lineage_order(cands: list[_Candidate]) -> list[_Candidate]:
    """Parents before children; otherwise by creation time (the order they were trained in)."""
    by_ref = {c.entry.ref: c for c in cands}
    done: dict[str, _Candidate] = {}

    def visit(c: _Candidate, path: tuple[str, ...]) -> None:
        if c.entry.ref in done:
            return
        if c.entry.ref in path:
            raise IntegrityError(f"lineage cycle through {c.entry.ref}", hint="nothing was imported")
        for p in c.manifest.parents:
            if p in by_ref:
                visit(by_ref[p], (*path, c.entry.ref))
        done[c.entry.ref] = c

    for c in sorted(cands, key=lambda c: (c.manifest.created, c.manifest.task, c.manifest.version)):
        visit(c, ())
    return list(done.values())


def _pull_cladapt(store: Store, api: HfApi, repo_id: str, commit: str, tree: dict[str, tuple[str, str | None, int]],
                  work: Path, tasks: list[str] | None, on_diverge: OnDiverge, base_model: str | None) -> PullResult:
    root = download(api, repo_id, commit, [INDEX_FILE], work / "repo")
    index = parse_index((root / INDEX_FILE).read_bytes(), f"{repo_id}@{commit[:12]}")
    _check_tree(index, tree, repo_id)
    manifests_only = [p for v in index.versions for p, f in v.files.items() if f.source == "manifest.json"]
    download(api, repo_id, commit, manifests_only, root)
    every: dict[str, _Candidate] = {}
    for entry in index.versions:
        mpath = next(p for p, f in entry.files.items() if f.source == "manifest.json")
        _verify_file(root, mpath, entry.files[mpath].sha256, entry.files[mpath].size, repo_id)
        manifest = _load_manifest(root, entry, repo_id)
        every[entry.ref] = _Candidate(entry, manifest, content_key(manifest))
    chosen = _close_over_parents([every[v.ref] for v in _select(index, tasks, repo_id)], every)
    _check_base(chosen, base_model, repo_id)
    plan, result = _plan_imports(store, _lineage_order(chosen), every, on_diverge, repo_id, commit, index.kind)
    wanted = [p for c, _ in plan for p in c.entry.files]
    wanted += [p for s in index.shared for p in s.files] + (["policy.json"] if index.policy and not tasks else [])
    download(api, repo_id, commit, wanted, root)
    for path, entry in index.all_files().items():
        if path in wanted:
            _verify_file(root, path, entry.sha256, entry.size, repo_id)
    from cladapt.registry.hub_import import commit_imports, import_policy, import_shared

    present = {v.remote: str(v.local) for v in result.versions if v.action == "present"}
    result.versions += commit_imports(store, root, plan, present, repo_id, commit)
    result.notes += import_shared(store, root, index.shared)
    if index.policy and not tasks:
        result.notes += import_policy(store, root, repo_id)
    return result


def _check_base(chosen: list[_Candidate], base_model: str | None, repo_id: str) -> None:
    if base_model is None:
        return
    from cladapt.base_model import fingerprint_folder, resolve_path

    fingerprint = fingerprint_folder(Path(resolve_path(base_model)))[0]
    wrong = [f"{c.entry.ref} (base {c.manifest.base_model.get('id')!r}, fingerprint {str(c.manifest.base_model['fingerprint'])[:16]})"
             for c in chosen if c.manifest.base_model["fingerprint"] != fingerprint]
    if wrong:
        raise IncompatibleBaseModel(
            f"{repo_id}: {len(wrong)} version(s) were trained on another base model than {base_model!r} "
            f"(fingerprint {fingerprint[:16]}): {', '.join(wrong)}",
            hint="pull with the base model they were trained on (--base-model), or without --base-model to skip this check",
        )


def _plan_imports(store: Store, ordered: list[_Candidate], every: dict[str, _Candidate], on_diverge: OnDiverge,
                  repo_id: str, commit: str, kind: str) -> tuple[list[tuple[_Candidate, str]], PullResult]:
    """Which versions are new, which are already here, and whether any task's history diverges."""
    result = PullResult(repo_id, commit, kind)
    plan: list[tuple[_Candidate, str]] = []
    diverged: dict[str, list[str]] = {}
    for task in dict.fromkeys(c.manifest.task for c in ordered):
        local = {content_key(r.manifest): str(r.ref) for r in store.list(task)} if task in store.tasks() else {}
        remote_keys = {c.key for c in every.values() if c.manifest.task == task}
        extra = sorted(ref for key, ref in local.items() if key not in remote_keys)
        if extra:
            diverged[task] = extra
        for c in (c for c in ordered if c.manifest.task == task):
            if c.key in local:
                result.versions.append(PulledVersion(c.entry.ref, local[c.key], "present", reason="same files already in the registry"))
            else:
                status = c.entry.status
                if extra and status == "active":
                    status = "candidate"
                plan.append((c, status))
    if diverged and any(c.manifest.task in diverged for c, _ in plan):
        lines = [f"{t}: local {', '.join(refs)} not in {repo_id}" for t, refs in diverged.items()]
        if on_diverge == "refuse":
            raise Conflict("the local history diverges from the repo's:\n  - " + "\n  - ".join(lines),
                           hint="nothing was imported; pull with --on-diverge append to add the repo's versions after "
                                "the local ones (as candidates, original refs kept in the audit log), or --task to pick others")
        result.notes += [f"diverged, appended as candidates: {line}" for line in lines]
    order = {c.entry.ref: i for i, c in enumerate(ordered)}
    plan.sort(key=lambda item: order[item[0].entry.ref])
    return plan, result


__all__ = ["PullResult", "PulledVersion", "content_key", "pull"]
