"""``cladapt methods``: the METHODS table with every setting."""

from __future__ import annotations

import json
from typing import Any

import click

from cladapt.cli.common import console, echo_json


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


commands: list[click.Command] = [methods_cmd]
