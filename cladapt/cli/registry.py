"""Registry commands: init, verify, gc, list, show, rm, export, generate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from cladapt.cli import route as route_cli
from cladapt.cli.common import (
    console,
    echo_json,
    err_console,
    flat_items,
    max_new_tokens_option,
    open_store,
    registry_option,
)


@click.group("registry")
def registry_group() -> None:
    """Create and check adapter registries."""


@registry_group.command("init")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path), required=False)
def registry_init(path: Path | None) -> None:
    """Create an empty registry at PATH (default: $CLADAPT_REGISTRY or ./.cladapt)."""
    from cladapt.cli.common import default_registry
    from cladapt.registry.store import Store

    store = Store.init(path or default_registry())
    console.print(f"initialised registry [bold]{store.root}[/]")


@registry_group.command("verify")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--reindex", is_flag=True, help="rebuild the index from the manifests first")
@click.option("--json", "as_json", is_flag=True, help="the report as JSON: ok, problems, checked, not covered, leftovers")
def registry_verify(path: Path | None, reindex: bool, as_json: bool) -> None:
    """Check every stored byte and the index against the manifests; exit 1 on any problem.

    Covered: version files, manifests, status files, evaluations, the policy, shared state, the
    audit log (hash chain) and the index. Files from before these checksums, and leftovers of
    killed processes in .work (removed by `registry gc`), are listed but are not problems.
    """
    store = open_store(path)
    report = store.verify_report(reindex=reindex)
    if as_json:
        echo_json({"ok": not report.problems, "registry": str(store.root),
                   "problems": [{"where": p.where, "message": p.message} for p in report.problems],
                   "checked": report.checked, "not_covered": report.not_covered, "leftovers": report.leftovers})
        sys.exit(1 if report.problems else 0)
    for p in report.problems:
        console.print(f"[red]{p.where}[/]: {p.message}", highlight=False)
    for item in report.not_covered:
        console.print(f"[yellow]not covered[/]: {item}", highlight=False)
    if report.leftovers:
        shown = ", ".join(report.leftovers[:5]) + (" ..." if len(report.leftovers) > 5 else "")
        console.print(f"[yellow]{len(report.leftovers)} leftover(s)[/] of killed processes: {shown} "
                      "(`cladapt registry gc` removes them; .work/runs/* are resumable checkpoints)", highlight=False)
    if report.problems:
        console.print(f"[bold red]{len(report.problems)} problem(s)[/]")
        sys.exit(1)
    c = report.checked
    console.print(
        f"[green]registry OK[/]: {c['versions']} version(s): {c['files']} file(s) and {c['manifests']} manifest(s) "
        f"match their sha256; {c['evaluations']} evaluation(s), {c['shared']} shared folder(s), the policy and "
        f"{c['audit lines']} audit line(s) checked" + (" (except what is listed as not covered)" if report.not_covered else ""),
        highlight=False,
    )


@registry_group.command("gc")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--runs", is_flag=True, help="also remove unclaimed run checkpoints (what `train --resume` continues from)")
@click.option("--dry-run", is_flag=True, help="only list what would be removed")
def registry_gc(path: Path | None, runs: bool, dry_run: bool) -> None:
    """Remove leftovers of killed processes from .work (staging folders, trash, temporaries).

    Folders a live process holds are never touched.
    """
    store = open_store(path)
    if dry_run:
        doomed = [p for p in store.leftovers() if runs or not p.startswith(".work/runs/")]
        for item in doomed:
            console.print(item, highlight=False)
        console.print(f"{len(doomed)} leftover(s) would be removed")
        return
    removed = store.gc(runs=runs)
    console.print(f"removed {len(removed)} leftover(s)" + (f": {', '.join(removed[:10])}" if removed else ""), highlight=False)


def _record_row(r: object) -> dict[str, object]:
    m = r.manifest  # type: ignore[attr-defined]
    return {
        "task": r.task, "version": r.version, "status": r.status, "method": r.method,  # type: ignore[attr-defined]
        "composition": r.composition, "r": r.r, "alpha": r.alpha,  # type: ignore[attr-defined]
        "base_model": m.base_model.get("id"), "base_fingerprint": r.base_fingerprint,  # type: ignore[attr-defined]
        "created": r.created, "parents": list(r.parents), "metrics": m.metrics,  # type: ignore[attr-defined]
    }


def _fmt_metrics(metrics: dict[str, object]) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.3g}")
        elif isinstance(v, (int, str)):
            parts.append(f"{k}={v}")
    return " ".join(parts[:4])


@click.command("list")
@registry_option
@click.option("--task", default=None, help="only this task")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (always every version)")
@click.option("--limit", type=click.IntRange(min=0), default=200, show_default=True,
              help="table: the newest N versions (0: all)")
def list_cmd(registry: Path | None, task: str | None, as_json: bool, limit: int) -> None:
    """Every version: task, version, status, method, rank, base model, created, metrics."""
    store = open_store(registry)
    records = store.list(task)
    for p in store.unlisted(task):  # never drop a version without a word
        err_console.print(f"[yellow]warning:[/] {p.where} is not listed: {p.message}", highlight=False)
    if as_json:
        echo_json([_record_row(r) for r in records])
        return
    total = len(records)
    if limit and total > limit:
        # rendering a rich table costs ~0.6 ms a row; huge registries are for --json and --task
        records = sorted(records, key=lambda r: r.created)[-limit:]
    table = Table(title=f"registry {store.root}", show_lines=False)
    for col in ("task", "ver", "status", "method", "comp", "r", "alpha", "base model", "created", "metrics"):
        table.add_column(col, overflow="fold")
    colors = {"active": "green", "rejected": "red", "archived": "dim", "candidate": "yellow"}
    for r in records:
        table.add_row(
            r.task, str(r.version), f"[{colors.get(r.status, 'white')}]{r.status}[/]", r.method, r.composition,
            str(r.r), f"{r.alpha:g}", str(r.manifest.base_model.get("id")), r.created[:19].replace("T", " "),
            _fmt_metrics(r.manifest.metrics),
        )
    console.print(table)
    if len(records) < total:
        console.print(f"(showing the newest {len(records)} of {total} versions; --limit 0 for all, --task T, --json)")
    if not records:
        console.print("(empty: `cladapt train --task NAME --data FILE` adds the first version)")


@click.command("show")
@click.argument("ref")
@registry_option
@click.option("--json", "as_json", is_flag=True)
def show_cmd(ref: str, registry: Path | None, as_json: bool) -> None:
    """Full metadata of one version (REF = task or task@N): files + sha256, lineage, config."""
    store = open_store(registry)
    rec = store.get(ref)
    payload = rec.manifest.model_dump(mode="json")
    payload["status"] = rec.status
    payload["path"] = str(rec.path)
    payload["evaluations"] = store.evaluations(f"{rec.task}@{rec.version}")
    dependants = [f"{r.task}@{r.version}" for r in store.list() if f"{rec.task}@{rec.version}" in r.parents]
    payload["dependants"] = dependants
    if as_json:
        echo_json(payload)
        return
    console.rule(f"[bold]{rec.task}@{rec.version}[/] ({rec.status})")
    for key in ("method", "composition", "created", "seed"):
        console.print(f"[bold]{key}[/]: {payload[key]}", highlight=False)
    for key, label in (("base_model", "base model"), ("lora", "lora"), ("method_config", "method config")):
        console.print(f"[bold]{label}[/]: " + "  ".join(f"{k}={v}" for k, v in flat_items(payload[key])), highlight=False)
    data = {k: v for k, v in payload["data"].items() if k != "sources"}
    console.print("[bold]data[/]: " + "  ".join(f"{k}={v}" for k, v in flat_items(data)), highlight=False)
    console.print(f"[bold]parents[/]: {', '.join(payload['parents']) or '-'}   "
                  f"[bold]dependants[/]: {', '.join(dependants) or '-'}", highlight=False)
    for title, section in (("training", payload["train_stats"]), ("metrics", payload["metrics"])):
        if section:
            table = Table("key", "value", title=title, title_justify="left")
            for key, value in flat_items(section):
                table.add_row(key, value)
            console.print(table)
    if not payload["metrics"]:
        console.print("[bold]metrics[/]: - (none recorded; `cladapt eval --adapter REF` adds some)")
    files = Table("file", "size", "sha256")
    for f in payload["files"]:
        files.add_row(f["path"], str(f["size"]), f["sha256"][:16] + "…")
    console.print(files)
    console.print("[bold]resolved config[/]:")
    click.echo(json.dumps(payload["config"], indent=2))


@click.command("rm")
@click.argument("ref")
@registry_option
@click.option("--force", is_flag=True, help="remove even if later versions list it as a parent")
@click.option("--yes", "-y", is_flag=True, help="do not ask before removing an active version")
def rm_cmd(ref: str, registry: Path | None, force: bool, yes: bool) -> None:
    """Remove one version, REF = TASK@N (refuses if a later version depends on it, unless --force).

    Removing the task's active version asks first (or takes --yes).
    """
    from cladapt.registry import AdapterRef

    parsed = AdapterRef.parse(ref)
    if parsed.version is None:
        raise click.UsageError(f"rm needs an explicit version such as {parsed.task}@1, not {ref!r} (see `cladapt list`)")
    store = open_store(registry)
    rec = store.get(parsed)
    if rec.status == "active" and not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(f"{rec.ref} is the active version of {rec.task}; pass --yes to remove it")
        click.confirm(f"{rec.ref} is the active version of {rec.task}; remove it?", abort=True)
    store.remove(rec.ref, force=force)
    console.print(f"removed {rec.task}@{rec.version}")


@click.command("export")
@click.argument("args", nargs=-1, metavar="[REF] OUT")
@registry_option
@click.option("--merged", is_flag=True, help="all active sum-composed adapters as ONE LoRA of rank sum(r_t)")
@click.option("--vllm", is_flag=True, help="every active adapter, one folder each, plus the `vllm serve` line")
@click.option("--base-model-id", default=None, help="--vllm: the model id vLLM serves (needed for a local base folder)")
def export_cmd(args: tuple[str, ...], registry: Path | None, merged: bool, vllm: bool, base_model_id: str | None) -> None:
    """Write a plain PEFT adapter folder (loadable by PeftModel.from_pretrained and vLLM).

    \b
    cladapt export sentiment out/            # one version
    cladapt export --merged out/             # the summed task adapters as one LoRA
    cladapt export --vllm out/               # every active adapter for `vllm serve --enable-lora`
    """
    from cladapt.adapters.export import export_merged, export_version

    if vllm:
        from cladapt.serve.export import export_vllm

        if not args or len(args) > 2 or merged:
            raise click.UsageError("--vllm takes [REF] OUT (default: every active version), not --merged")
        done = export_vllm(open_store(registry), Path(args[-1]), base_model_id=base_model_id,
                           refs=[args[0]] if len(args) == 2 else None)
        for a in done.adapters:
            console.print(f"exported {a['ref']} (r={a['r']}) to {a['path']}", highlight=False)
        for ref in done.skipped:
            console.print(f"[yellow]skipped {ref}[/]: trained on another base model", highlight=False)
        console.print(f"base model {done.base_model}; --max-lora-rank {done.max_lora_rank}; "
                      f"{done.out / 'lora-modules.json'}; run:", highlight=False)
        click.echo(done.command)
        return
    if merged:
        if len(args) != 1:
            raise click.UsageError("--merged takes only OUT: it merges every active sum-composed version")
        store = open_store(registry)
        result = export_merged(store, Path(args[0]))
        console.print(
            f"exported {len(result.refs)} adapters ({', '.join(result.refs)}) "
            f"as one LoRA of rank {result.rank} to {result.out}"
        )
        if result.skipped:  # never leave adapters out without a word
            err_console.print(f"[yellow]warning:[/] left out {', '.join(result.skipped)}: trained on another base "
                              "model than the newest version's", highlight=False)
        return
    if len(args) != 2:
        raise click.UsageError("give REF (task or task@N) and OUT, or --merged OUT")
    result = export_version(open_store(registry), args[0], Path(args[1]))
    console.print(f"exported {result.refs[0]} to {result.out}")


@click.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@registry_option
@click.option("--adapter", "adapters", multiple=True, help="version(s) to apply (task or task@N)")
@click.option("--compose", type=click.Choice(["sum"]), default=None, help="all active sum-composed adapters at once")
@click.option("--base-model", default=None, help="override the base model recorded in the adapter")
@max_new_tokens_option("the budget the adapter's own evaluation used (longest label + 4), else the default")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="a picture shown with every prompt (vision-language bases; repeatable)")
@click.option("--router", default=None, help="route each prompt without a task id (dtkr, mos, arrow, ...; `cladapt route list`)")
@route_cli.router_options
@click.option("--json", "as_json", is_flag=True, help="one record per prompt: prompt, answer, adapters applied")
def generate_cmd(
    prompts: tuple[str, ...], registry: Path | None, adapters: tuple[str, ...], compose: str | None,
    base_model: str | None, max_new_tokens: int | str, images: tuple[Path, ...], router: str | None,
    settings: tuple[str, ...], top_k: int | None, compositions: str, as_json: bool,
) -> None:
    """Answer PROMPTS with the base model plus adapter(s), greedy, through the chat template.

    \b
    cladapt generate --adapter amazon "..."        # one version
    cladapt generate --router dtkr "..." "..."     # each prompt routed on its own; shows the adapter it used
    cladapt generate --adapter vqa --image photo.png "What is on the table?"
    """
    from cladapt.adapters.loading import load_with_adapters
    from cladapt.budget import recorded_budget
    from cladapt.data.image_rows import image_prompts
    from cladapt.text.generation import generate

    if router is not None:
        _generate_routed(prompts, registry, adapters, compose, base_model, max_new_tokens, images, router, settings,
                         top_k, compositions, as_json)
        return
    store = open_store(registry)
    with load_with_adapters(store, adapters=adapters, compose=compose, base_model=base_model) as (model, tok, _, applied):
        budget = recorded_budget(store, applied.refs) if max_new_tokens == "auto" else int(max_new_tokens)
        conversations = image_prompts(list(prompts), [str(i) for i in images], tok)
        answers = generate(model, tok, conversations, max_new_tokens=budget)
    if as_json:
        echo_json([{"prompt": p, "answer": a, **applied.to_json(), "max_new_tokens": budget}
                   for p, a in zip(prompts, answers, strict=True)])
        return
    for p, a in zip(prompts, answers, strict=True):
        console.print(f"[dim]({applied.label})[/] [bold]{p}[/]", highlight=False)
        click.echo(a)


def _generate_routed(prompts: tuple[str, ...], registry: Path | None, adapters: tuple[str, ...], compose: str | None,
                     base_model: str | None, max_new_tokens: int | str, images: tuple[Path, ...], router: str,
                     settings: tuple[str, ...], top_k: int | None, compositions: str, as_json: bool) -> None:
    from cladapt.budget import recorded_budget

    if images:
        raise click.UsageError("--image is not routed: pick the adapter with --adapter")
    if adapters or compose:
        raise click.UsageError("--router chooses the adapters itself: drop --adapter/--compose")
    session = route_cli.session_for(registry, router, settings, top_k, compositions, base_model)
    routes = session.route(list(prompts))
    chosen = sorted({ref for r in routes for ref, _ in r.adapters if "@" in ref})  # versions, not compositions
    budget = recorded_budget(open_store(registry), chosen) if max_new_tokens == "auto" else int(max_new_tokens)
    answers = session.generate(list(prompts), routes, max_new_tokens=budget)
    if as_json:
        echo_json([{"prompt": p, "answer": a, "router": router, "max_new_tokens": budget, **r.to_json()}
                   for p, r, a in zip(prompts, routes, answers, strict=True)])
        return
    for p, r, a in zip(prompts, routes, answers, strict=True):
        route_cli.show_route(p, r, answer=a)


commands: list[click.Command] = [registry_group, list_cmd, show_cmd, rm_cmd, export_cmd, generate_cmd]
