"""Governance commands: the admission gate (set, show, clear), promote, rollback, and the audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cladapt.cli.common import actor, console, echo_json, open_store, registry_option


@click.group("gate")
def gate_group() -> None:
    """The admission policy every newly trained version must pass to become active."""


@gate_group.command("set")
@registry_option
@click.option("--max-drop", type=float, default=None, help="points any earlier task may lose (vs. its last recorded score)")
@click.option("--max-ppl-rise", default=None, help="general-perplexity rise allowed over the base model, e.g. 5%")
@click.option("--min-score", type=float, default=None, help="lowest score (%) the new task must reach")
@click.option("--ppl-data", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="general texts (JSON Lines with 'text') for --max-ppl-rise")
def gate_set(registry: Path | None, max_drop: float | None, max_ppl_rise: str | None, min_score: float | None,
             ppl_data: tuple[Path, ...]) -> None:
    """Set thresholds (keys not given keep their current value).

    \b
    cladapt gate set --max-drop 2 --min-score 60
    cladapt gate set --max-ppl-rise 5% --ppl-data general.jsonl
    """
    from pydantic import ValidationError

    from cladapt.errors import ConfigError, Issue
    from cladapt.evaluation.gate import GatePolicy, load_policy, save_policy

    store = open_store(registry)
    current = load_policy(store)
    values = current.model_dump(exclude_none=True) if current else {}
    given = {"max_drop": max_drop, "max_ppl_rise": max_ppl_rise, "min_score": min_score,
             "ppl_data": [str(p.resolve()) for p in ppl_data] or None}
    values.update({k: v for k, v in given.items() if v is not None})
    try:
        policy = GatePolicy.model_validate(values)
    except ValidationError as exc:
        raise ConfigError([Issue(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}" if e["loc"] else "gate", e["msg"])
                           for e in exc.errors()]) from exc
    save_policy(store, policy, actor=actor())
    _show_policy(policy)


@gate_group.command("show")
@registry_option
@click.option("--json", "as_json", is_flag=True)
def gate_show(registry: Path | None, as_json: bool) -> None:
    """Print the current policy."""
    from cladapt.evaluation.gate import load_policy

    policy = load_policy(open_store(registry))
    if as_json:
        echo_json(policy.model_dump(mode="json") if policy else None)
    else:
        _show_policy(policy)


@gate_group.command("clear")
@registry_option
def gate_clear(registry: Path | None) -> None:
    """Remove the policy: every new version becomes active."""
    from cladapt.evaluation.gate import save_policy

    save_policy(open_store(registry), None, actor=actor())
    console.print("gate cleared: new versions are admitted without checks")


def _show_policy(policy: Any) -> None:
    if policy is None:
        console.print("no gate: new versions become active without checks")
        return
    parts = [f"max_drop {policy.max_drop:g} points" if policy.max_drop is not None else None,
             f"max_ppl_rise {policy.max_ppl_rise:g}% over the base model" if policy.max_ppl_rise is not None else None,
             f"min_score {policy.min_score:g}%" if policy.min_score is not None else None]
    console.print("gate: " + ", ".join(p for p in parts if p), highlight=False)
    if policy.ppl_data:
        console.print(f"  perplexity data: {', '.join(policy.ppl_data)}", highlight=False)


@click.command("promote")
@click.argument("ref")
@registry_option
@click.option("--reason", default="", help="recorded in the audit log")
def promote_cmd(ref: str, registry: Path | None, reason: str) -> None:
    """Make REF (task@N) the active version of its task, even if the gate rejected it (audited)."""
    from cladapt.registry.lifecycle import promote

    rec = promote(open_store(registry), ref, actor=actor(), reason=reason)
    console.print(f"[bold]{rec.task}@{rec.version}[/] is now [green]{rec.status}[/]")


@click.command("rollback")
@click.argument("task")
@registry_option
@click.option("--reason", default="", help="recorded in the audit log")
def rollback_cmd(task: str, registry: Path | None, reason: str) -> None:
    """Re-activate TASK's previous non-rejected version; the current one is marked rejected (audited)."""
    from cladapt.registry.lifecycle import rollback

    store = open_store(registry)
    old = store.active(task)
    rec = rollback(store, task, actor=actor(), reason=reason)
    console.print(f"rolled back {task}: [red]{old.ref if old else '?'}[/] -> [green]{rec.task}@{rec.version}[/]")


@click.command("log")
@registry_option
@click.option("--task", default=None, help="only events of this task")
@click.option("--limit", type=int, default=50, show_default=True, help="newest N events (0: all)")
@click.option("--json", "as_json", is_flag=True)
def log_cmd(registry: Path | None, task: str | None, limit: int, as_json: bool) -> None:
    """The audit log: who changed what, when and why (commits, status changes, policy, evaluations)."""
    events = open_store(registry).audit_log()
    if task:
        events = [e for e in events if str(e.get("ref") or "").split("@")[0] == task]
    events = events[-limit:] if limit else events
    if as_json:
        echo_json(events)
        return
    table = Table("time", "actor", "action", "ref", "change", "reason")
    for e in events:
        change = f"{e.get('from') or '(new)'} -> {e.get('to')}" if e.get("action") in ("status", "commit") else ""
        if e.get("action") == "policy":
            change = json.dumps(e.get("to"), default=str)
        table.add_row(str(e.get("time", ""))[:19].replace("T", " "), str(e.get("actor", "")), str(e.get("action", "")),
                      str(e.get("ref") or ""), change, str(e.get("reason", "")))
    console.print(table)



commands: list[click.Command] = [gate_group, promote_cmd, rollback_cmd, log_cmd]
