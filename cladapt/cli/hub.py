"""``cladapt push`` and ``cladapt pull``: the Hugging Face Hub as a sync target for the registry."""

from __future__ import annotations

from pathlib import Path

import click

from cladapt.cli.common import console, echo_json, open_store, registry_option


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@click.command("push")
@click.argument("ref", required=False)
@click.option("--repo", "repo_id", required=True, help="Hub repo id, e.g. org/support-adapters")
@click.option("--all", "all_versions", is_flag=True, help="push the whole registry (one folder per version), not one REF")
@registry_option
@click.option("--private", is_flag=True, help="create the repo private (ignored if it exists)")
@click.option("--revision", default="main", show_default=True, help="branch to commit to (created if missing)")
@click.option("--tag", default=None, help="tag the pushed commit (fails if the tag exists)")
@click.option("--base-model-id", default=None, metavar="ORG/NAME",
              help="Hub id of the base model, for versions trained on a local folder")
@click.option("-m", "--message", default=None, help="commit message")
@click.option("--dry-run", is_flag=True, help="list what would be uploaded and deleted; write nothing")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def push_cmd(ref: str | None, repo_id: str, all_versions: bool, registry: Path | None, private: bool | None, revision: str,
             tag: str | None, base_model_id: str | None, message: str | None, dry_run: bool, as_json: bool) -> None:
    """Push one version (a plain PEFT repo with a model card) or, with --all, the whole registry.

    \b
    cladapt push amazon@3 --repo org/cladapt-amazon --tag v3
    cladapt push --all --repo org/support-adapters
    Token: HF_TOKEN or `hf auth login`; endpoint: HF_ENDPOINT.
    """
    from cladapt.registry.hub import push

    if bool(ref) == all_versions:
        raise click.UsageError("give either a REF (one version) or --all (the whole registry)")
    store = open_store(registry)
    res = push(store, repo_id, ref, private=private or None, revision=revision, tag=tag, base_model_id=base_model_id,
               message=message, dry_run=dry_run)
    if as_json:
        echo_json({"repo": res.repo_id, "revision": res.revision, "commit": res.commit, "dry_run": res.dry_run,
                   "versions": res.versions, "uploads": [u.path for u in res.uploads], "deletes": res.deletes,
                   "unchanged": len(res.unchanged), "tag": res.tag})
        return
    verb = "would upload" if dry_run else "uploaded"
    for up in res.uploads:
        console.print(f"  {verb} {up.path} ({_size(up.size)})", highlight=False)
    for path in res.deletes:
        console.print(f"  {'would delete' if dry_run else 'deleted'} {path}", highlight=False)
    total = sum(u.size for u in res.uploads)
    summary = (f"{len(res.versions)} version(s) -> {res.repo_id}@{res.revision}: {len(res.uploads)} file(s) {verb} "
               f"({_size(total)}), {len(res.deletes)} deleted, {len(res.unchanged)} unchanged")
    if dry_run:
        console.print(f"dry run: {summary}", highlight=False)
        return
    console.print(f"pushed {summary}; commit {str(res.commit)[:12]}" + (f", tagged {res.tag}" if res.tag else ""), highlight=False)


@click.command("pull")
@click.argument("repo_id")
@registry_option
@click.option("--revision", default=None, help="branch, tag or commit sha [default: main]")
@click.option("--task", "tasks", multiple=True,
              help="only this task (and its ancestors); for a plain PEFT repo: the task it becomes a version of")
@click.option("--on-diverge", type=click.Choice(["refuse", "append"]), default="refuse", show_default=True,
              help="when a task's local history has versions the repo lacks: refuse, or append the repo's as candidates")
@click.option("--base-model", default=None,
              help="check the adapters against this base model (default for a plain PEFT repo: smollm2-135m-instruct)")
@click.option("--base-model-id", default=None, metavar="ORG/NAME", help="Hub id of --base-model when it is a local folder")
@click.option("--subfolder", default=None, help="for a plain PEFT repo: the folder holding the adapter")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def pull_cmd(repo_id: str, registry: Path | None, revision: str | None, tasks: tuple[str, ...], on_diverge: str,
             base_model: str | None, base_model_id: str | None, subfolder: str | None, as_json: bool) -> None:
    """Import a pushed version or registry (verified, lineage kept), or any PEFT LoRA repo.

    \b
    cladapt pull org/support-adapters --registry ./reg --revision v3
    cladapt pull some-user/plain-peft-lora --task legal
    Every file is checked against its sha256 before anything is committed; versions already in the
    registry are skipped; a killed pull leaves the registry as it was.
    """
    from cladapt.registry.hub import pull

    store = open_store(registry, create=True, create_named=True)  # documented: pull into a new folder
    res = pull(store, repo_id, revision=revision, tasks=list(tasks) or None, on_diverge=on_diverge,  # type: ignore[arg-type]
               base_model=base_model, base_model_id=base_model_id, subfolder=subfolder)
    if as_json:
        echo_json({"repo": res.repo_id, "commit": res.commit, "kind": res.kind, "notes": res.notes,
                   "versions": [vars(v) for v in res.versions]})
        return
    for v in res.versions:
        detail = f" ({v.status})" if v.status else ""
        line = f"  {v.action} {v.remote} -> {v.local}{detail}" + (f": {v.reason}" if v.reason else "")
        console.print(line, highlight=False)
    for note in res.notes:
        console.print(f"  {note}", highlight=False)
    console.print(f"pulled {res.repo_id}@{res.commit[:12]} into {store.root}: {len(res.imported)} imported, "
                  f"{len(res.versions) - len(res.imported)} already present", highlight=False)


commands: list[click.Command] = [push_cmd, pull_cmd]
