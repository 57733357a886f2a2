"""``cladapt methods`` (the METHODS table) and ``cladapt forget`` (forgetting methods, GS-LoRA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cladapt.cli.common import config_options, console, echo_json, flat_items, open_store, registry_option, scalar


def describe_methods() -> list[dict[str, Any]]:
    """Every registered method with its capabilities and config fields (defaults, descriptions)."""
    from pydantic_core import PydanticUndefined

    from cladapt.adapters import METHODS

    out = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        fields = []
        for field_name, info in cls.Config.model_fields.items():
            if field_name == "name":
                continue
            default = None if info.default is PydanticUndefined else info.default
            fields.append({"name": field_name, "default": default, "description": info.description or ""})
        out.append(
            {
                "name": name,
                "summary": cls.summary,
                "composition": cls.composition,
                "freezes_history": cls.freezes_history,
                "forgetting": cls.forgetting,
                "supports_zero3": cls.supports_zero3,
                "command": "forget" if cls.forgetting else "train",
                "config": fields,
            }
        )
    return out


@click.command("methods")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def methods_cmd(as_json: bool) -> None:
    """List the continual-learning methods, their composition and config fields.

    \b
    cladapt methods
    cladapt train --task t --data t.jsonl --method olora --set method.lambda1=0.3
    """
    rows = describe_methods()
    if as_json:
        echo_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        flags = [f"composition={r['composition']}"]
        if not r["freezes_history"]:
            flags.append("continues its adapter")
        if r["forgetting"]:
            flags.append("via `cladapt forget`")
        console.print(
            f"[bold]{r['name']:<{width}}[/]  {r['summary']}  [dim]({', '.join(flags)})[/]",
            highlight=False,
            soft_wrap=True,
        )
        for f in r["config"]:
            console.print(
                f"  {'':<{width}}[cyan]method.{f['name']}[/] = {json.dumps(f['default'])}  [dim]{f['description']}[/]",
                highlight=False,
                soft_wrap=True,
            )


@click.command("forget")
@click.option("--task", required=True, help="name of the forgetting version (e.g. forget-sentiment)")
@click.option(
    "--forget",
    "forget",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="rows whose knowledge is removed (.jsonl/.json/.csv/...; repeatable)",
)
@click.option(
    "--retain",
    "retain",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="rows whose knowledge must be kept (repeatable)",
)
@click.option("--prototypes", is_flag=True, help="GS-LoRA++: add the prototype losses (method.prototypes=true)")
@click.option("--method", default="gslora", show_default=True, help="a forgetting method (see `cladapt methods`)")
@config_options
@registry_option
@click.option("--base-model", default=None, help="Hugging Face id or folder [default: smollm2-135m-instruct]")
@click.option("--seed", type=int, default=None, help="shortcut for --set train.seed=N")
@click.option("--resume", is_flag=True, help="continue an interrupted run of the same request")
@click.option("--json", "as_json", is_flag=True, help="print the new version's record as JSON")
def forget_cmd(
    task: str,
    forget: tuple[Path, ...],
    retain: tuple[Path, ...],
    prototypes: bool,
    method: str,
    configs: tuple[str, ...],
    overrides: tuple[str, ...],
    registry: Path | None,
    base_model: str | None,
    seed: int | None,
    resume: bool,
    as_json: bool,
) -> None:
    """Train a forgetting adapter (GS-LoRA, docs/methods.md §8) and commit it as a new version.

    \b
    cladapt forget --task forget-topics --forget topics.jsonl --retain sentiment.jsonl
    cladapt forget --task forget-topics --forget topics.jsonl --retain sentiment.jsonl --prototypes

    The adapter joins the active sum of adapters; groups (layers) it barely uses are pruned to
    exactly zero. gslora.json records forget/retain CE and accuracy before and after.
    """
    from cladapt import distributed
    from cladapt.config import load_config
    from cladapt.train.distributed import main_first, start
    from cladapt.train.run import train_from_config

    start()  # several processes (torchrun): join them; process 0 alone commits and prints
    extra = [f"base_model={base_model}"] if base_model else []
    if seed is not None:
        extra.append(f"train.seed={seed}")
    if prototypes:
        extra.append("method.prototypes=true")
    cfg, _ = load_config(method=method, files=configs, overrides=[*overrides, *extra])
    store = main_first(lambda: open_store(registry, create=True))
    record = train_from_config(store, task, [str(p) for p in retain], cfg, forget_data=[str(p) for p in forget],
                               resume=resume)
    if not distributed.is_main():
        return
    if as_json:
        click.echo(json.dumps(record.manifest.model_dump(mode="json"), indent=2))
        return
    stats = record.manifest.train_stats
    console.print(
        f"[bold]{record.task}@{record.version}[/] committed as {record.status} "
        f"({record.method}, {stats.get('steps')} steps, loss {scalar(stats.get('train_loss'))})"
    )
    if record.manifest.metrics:
        table = Table("metric", "value")
        for key, value in flat_items(record.manifest.metrics):
            table.add_row(key, value)
        console.print(table)


commands: list[click.Command] = [methods_cmd, forget_cmd]
