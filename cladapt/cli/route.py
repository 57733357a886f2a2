"""Routing commands: ``cladapt route`` (which adapter, and why), ``route eval``, ``route index``, ``route list``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cladapt.cli.common import console, echo_json, open_store, registry_option

DEFAULT_ROUTER = "lda"  # the most accurate in bench/results/routing_accuracy_encoder.json


class _DefaultGroup(click.Group):
    """``cladapt route TEXT...`` routes; ``cladapt route eval|index|list ...`` are subcommands."""

    default = "query"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default, *args]
        elif not args:
            args = [self.default, "--help"]
        return super().parse_args(ctx, args)


def router_options(func: Any) -> Any:
    """``--router``, ``--set KEY=VALUE`` (router settings), ``--top-k`` and ``--compositions``."""
    func = click.option("--compositions", default="route", show_default=True,
                        help="candidate versions: route (one LoRA per task), sum (the sum-composed sequence), or both")(func)
    func = click.option("--top-k", type=click.IntRange(min=1), default=None,
                        help="adapters mixed per request (> 1: JARe weighted combination) [router setting top_k]")(func)
    func = click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                        help="a router setting, e.g. --set retrieve=4 (repeatable; see `cladapt route list`)")(func)
    return func


def _config(router: str, settings: tuple[str, ...], top_k: int | None) -> Any:
    from cladapt.serve.routers.state import router_config

    return router_config(router, [*settings, *([f"top_k={top_k}"] if top_k else [])])


def _compositions(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def session_for(registry: Path | None, router: str, settings: tuple[str, ...], top_k: int | None, compositions: str,
             base_model: str | None) -> Any:
    from cladapt.serve.routers.session import RoutingSession

    return RoutingSession(open_store(registry), router, config=_config(router, settings, top_k),
                          base_model=base_model, compositions=_compositions(compositions))


def show_route(prompt: str, route: Any, *, answer: str | None = None) -> None:
    """One request's route: the chosen adapter(s) with weights, then every candidate's score."""
    chosen = ", ".join(f"{ref} ({w:.2f})" for ref, w in route.adapters) or "base model"
    console.print(f"[bold]{prompt[:100]}[/]" + ("..." if len(prompt) > 100 else ""), highlight=False)
    console.print(f"  -> {chosen} [dim]{route.combine}[/]", highlight=False)
    scores = sorted(route.scores.items(), key=lambda kv: -kv[1])
    console.print("  scores: " + "  ".join(f"{ref} {s:.3f}" for ref, s in scores[:10]), highlight=False)
    if answer is not None:
        click.echo(f"  answer: {answer}")


@click.group("route", cls=_DefaultGroup)
def route_group() -> None:
    """Pick the adapter per request without a task id: `cladapt route TEXT`, `route eval`, `route index`.

    \b
    cladapt route "Title: Stocks rally as ..."              # which adapter(s), weights, every candidate's score
    cladapt route --router mos --json "..."
    cladapt route eval --data-dir ../shared/data/cl-benchmark --tasks agnews,amazon --router dtkr,mos
    cladapt route index --task amazon --data amazon.jsonl  # signatures for versions trained before routing
    """


@route_group.command("query", hidden=True)
@click.argument("prompts", nargs=-1, required=True)
@registry_option
@click.option("--router", default=DEFAULT_ROUTER, show_default=True, help="a router (see `cladapt route list`)")
@router_options
@click.option("--task", "tasks", multiple=True, help="the task of each prompt (for --router oracle)")
@click.option("--base-model", default=None, help="[default: the one the candidates were trained on]")
@click.option("--json", "as_json", is_flag=True)
def route_query(prompts: tuple[str, ...], registry: Path | None, router: str, settings: tuple[str, ...],
                top_k: int | None, compositions: str, tasks: tuple[str, ...], base_model: str | None, as_json: bool) -> None:
    """Route PROMPTS: the chosen adapter(s), their weights, and every candidate's score."""
    session = session_for(registry, router, settings, top_k, compositions, base_model)
    routes = session.route(list(prompts), task_ids=list(tasks) if tasks else None)
    if as_json:
        echo_json([{"prompt": p, "router": router, **r.to_json()} for p, r in zip(prompts, routes, strict=True)])
        return
    for p, r in zip(prompts, routes, strict=True):
        show_route(p, r)


@route_group.command("eval")
@registry_option
@click.option("--router", "routers", default=DEFAULT_ROUTER, show_default=True, help="comma-separated routers")
@router_options
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a CL benchmark folder (<task>/test.jsonl)")
@click.option("--tasks", default=None, help="comma-separated tasks of --data-dir [default: the registry's candidates]")
@click.option("--data", "files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="labelled requests instead of --data-dir: each row's 'task' field (or the file name) is its task")
@click.option("--split", default="test", show_default=True)
@click.option("--no-instruction", is_flag=True, help="route on the input alone (benchmark instructions name the task type)")
@click.option("--limit", type=int, default=None, help="a seeded sample of this many rows per task")
@click.option("--base-model", default=None)
@click.option("--json", "as_json", is_flag=True)
def route_eval(registry: Path | None, routers: str, settings: tuple[str, ...], top_k: int | None, compositions: str,
               data_dir: Path | None, tasks: str | None, files: tuple[Path, ...], split: str, no_instruction: bool,
               limit: int | None, base_model: str | None, as_json: bool) -> None:
    """Routing accuracy per router: per request, with a confusion matrix (amazon/yelp also merged)."""
    from cladapt.route_eval import benchmark_rows, route_accuracy, rows_from_files

    if bool(data_dir) == bool(files):
        raise click.UsageError("give --data-dir (with --tasks) or --data FILE...")
    names = [r.strip() for r in routers.split(",") if r.strip()]
    results = []
    for name in names:
        session = session_for(registry, name, settings if len(names) == 1 else (), top_k, compositions, base_model)
        if data_dir is not None:
            wanted = [t.strip() for t in tasks.split(",")] if tasks else sorted({v.task for v in session.router.tasks.values()})
            rows = benchmark_rows(data_dir, wanted, split=split, instruction=not no_instruction, limit=limit)
        else:
            rows = rows_from_files(list(files))
        results.append(route_accuracy(session, rows))
    if as_json:
        echo_json([r.to_json() for r in results])
        return
    table = Table("router", "rows", "accuracy %", "merged %", "ms/request", title="routing accuracy")
    for r in results:
        table.add_row(r.router, str(r.accuracy.n), f"{r.accuracy.accuracy:.2f}", f"{r.accuracy.accuracy_merged:.2f}",
                      f"{1000 * r.seconds_per_request:.1f}")
    console.print(table)
    for r in results:
        _confusion(r)


def _confusion(run: Any) -> None:
    acc = run.accuracy
    predicted = sorted({p for row in acc.confusion.values() for p in row})
    table = Table("gold \\ routed to", *predicted, "acc %", title=f"{run.router}: confusion")
    for gold, row in acc.confusion.items():
        table.add_row(gold, *[str(row.get(p, "")) for p in predicted], f"{acc.per_task[gold]:.1f}")
    console.print(table)


@route_group.command("index")
@registry_option
@click.option("--task", required=True, help="the task (its active version), or task@N")
@click.option("--data", "files", required=True, multiple=True, type=click.Path(exists=True, path_type=Path),
              help="the task's training data (repeatable)")
@click.option("--seed", type=int, default=None, help="sampling seed [default: the version's training seed]")
@click.option("--base-model", default=None, help="[default: the one the version was trained on]")
@click.option("--force", is_flag=True, help="recompute an indexed signature")
def route_index(registry: Path | None, task: str, files: tuple[Path, ...], seed: int | None, base_model: str | None,
                force: bool) -> None:
    """Write the routing signature of a version trained before routing existed (versions stay untouched)."""
    from cladapt.base_model import load
    from cladapt.train.signatures import index_version

    store = open_store(registry)
    loaded = load(base_model) if base_model else None
    sig = index_version(store, task, [str(f) for f in files], seed=seed, loaded=loaded, force=force)
    rec = store.get(task)
    spaces = ", ".join(k for k in ("base", "own", "encoder") if k in sig.tensors())
    console.print(f"indexed {rec.task}@{rec.version}: {sig.base.shape[0]} prompts ({spaces})", highlight=False)


@route_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def route_list(as_json: bool) -> None:
    """The routers and their settings."""
    from cladapt.serve.routers import ROUTERS

    rows = []
    for name in ROUTERS.names():
        cls = ROUTERS.get(name)
        fields = {k: {"default": f.default, "help": f.description} for k, f in cls.Config.model_fields.items() if k != "name"}
        rows.append({"name": name, "summary": cls.summary, "settings": fields})
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        console.print(f"[bold]{row['name']}[/]  {row['summary']}", highlight=False)
        for key, f in row["settings"].items():
            console.print(f"    {key} = {f['default']!r}  [dim]{f['help'] or ''}[/]", highlight=False)


commands: list[click.Command] = [route_group]
