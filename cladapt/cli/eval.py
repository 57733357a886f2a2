"""Evaluation commands: eval (held-out scores, recorded on the version), history (the accuracy matrix), report."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from cladapt.cli import route as route_cli
from cladapt.cli.common import (
    DATA_HELP,
    actor,
    console,
    data_split_option,
    echo_json,
    fixed,
    max_new_tokens_option,
    open_store,
    registry_option,
)

_SCORES = ("score", "exact_match", "format_rate", "constrained", "rouge_l", "max_new_tokens", "precision", "seconds")


@click.command("eval")
@registry_option
@click.option("--adapter", "adapter", default=None, metavar="REF", help="one registry version (task, task@N)")
@click.option("--compose", type=click.Choice(["sum"]), default=None, help="every active sum-composed adapter at once")
@click.option("--data", "data", required=True, multiple=True, help=f"held-out data: {DATA_HELP} (repeatable)")
@data_split_option
@click.option("--task", default=None, help="task the data belongs to [default: the rows' task field, else the adapter's task]")
@click.option("--mode", type=click.Choice(["generate", "constrained", "both"]), default="generate", show_default=True,
              help="strict exact match on greedy answers, log-likelihood choice among the labels, or both")
@max_new_tokens_option("each task's longest label + 4 (50 for free text)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="score a seeded sample of this many rows")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16", "auto"]), default="no", show_default=True,
              help="autocast the forward passes (auto: bf16 where the hardware has it); recorded with the score")
@click.option("--base-model", default=None, help="[default: the one the adapter was trained on]")
@click.option("--record/--no-record", default=True, show_default=True,
              help="attach the result to the evaluated version (evals/eval-<task>.json)")
@click.option("--name", default=None, help="name of the record on the version [default: eval-<task>]")
@click.option("--json", "as_json", is_flag=True)
@click.option("--router", default=None, help="route every row without a task id and score the routed answers")
@route_cli.router_options
def eval_cmd(registry: Path | None, adapter: str | None, compose: str | None, data: tuple[str, ...],
             data_split: str | None, task: str | None, mode: str, max_new_tokens: int | str, limit: int | None,
             batch_size: int, mixed_precision: str, base_model: str | None, record: bool, name: str | None,
             as_json: bool, router: str | None, settings: tuple[str, ...], top_k: int | None, compositions: str) -> None:
    """Score the base model, one adapter, the composed sum, or routed adapters on held-out data.

    The result is recorded on the version evaluated as eval-<task>: the task is --task, else the
    rows' task field, else the adapter's own task (never the file name); --name names it yourself.

    \b
    cladapt eval --adapter amazon --data amazon-test.jsonl
    cladapt eval --compose sum --data agnews-test.jsonl --mode both
    cladapt eval --data agnews-test.jsonl --base-model smollm2-135m-instruct   # the base model alone
    cladapt eval --router dtkr --data mixed_test.jsonl   # each row routed; scores per task (row 'task' field)
    """
    if router is not None:
        if adapter or compose:
            raise click.UsageError("--router chooses the adapters itself: drop --adapter/--compose")
        _eval_routed(registry, router, settings, top_k, compositions, data, task, mode, max_new_tokens, limit,
                     batch_size, mixed_precision, base_model, as_json)
        return
    from cladapt.evaluation.held_out import evaluate_held_out

    store = open_store(registry) if (adapter or compose) else None
    out = evaluate_held_out(store, list(data), adapter=adapter, compose=compose, base_model=base_model, task=task,
                            split=data_split, mode=mode, max_new_tokens=max_new_tokens, limit=limit,
                            batch_size=batch_size, precision=mixed_precision, record=record, name=name, actor=actor())
    if as_json:
        echo_json(out.payload)
        return
    p = out.payload
    console.print(f"[bold]{out.task}[/] ({p['kind']}, {p['n']} rows, {out.applied.label})", highlight=False)
    table = Table("metric", "value")
    for key in _SCORES:
        if p.get(key) is not None:
            table.add_row(key, fixed(p[key], 2))
    console.print(table)
    if out.recorded_as:
        console.print(f"recorded on {out.applied.refs[-1]} as {out.recorded_as}", highlight=False)


def _eval_routed(registry: Path | None, router: str, settings: tuple[str, ...], top_k: int | None, compositions: str,
                 data: tuple[str, ...], task: str | None, mode: str, max_new_tokens: int | str, limit: int | None,
                 batch_size: int, precision: str, base_model: str | None, as_json: bool) -> None:
    import random

    from cladapt.route_eval import evaluate_with_router, rows_from_files

    session = route_cli.session_for(registry, router, settings, top_k, compositions, base_model)
    rows = rows_from_files([Path(d) for d in data], task=task)
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), limit))]
    budget = None if max_new_tokens == "auto" else int(max_new_tokens)
    out = evaluate_with_router(session, rows, mode=mode, max_new_tokens=budget, batch_size=batch_size, precision=precision)
    if as_json:
        echo_json(out)
        return
    table = Table("task", "rows", "score", "routed correctly %", "routed to", title=f"routed by {router}")
    for name, res in out["tasks"].items():
        routed = ", ".join(f"{t} {k}" for t, k in sorted(res["routed_to"].items(), key=lambda kv: -kv[1]))
        table.add_row(name, str(res["n"]), fixed(res["score"], 2), fixed(out["routing"]["per_task"].get(name), 1), routed)
    console.print(table)
    console.print(f"score {out['score']:.2f} over {out['n']} rows; routing accuracy {out['routing']['accuracy']:.2f}% "
                  f"(merged groups {out['routing']['accuracy_merged']:.2f}%)", highlight=False)


@click.command("history")
@registry_option
@click.option("--all", "show_all", is_flag=True, help="also list every evaluated version (rejected and archived too)")
@click.option("--json", "as_json", is_flag=True)
def history_cmd(registry: Path | None, show_all: bool, as_json: bool) -> None:
    """The accuracy matrix so far (R[t][i], b) with AA, LA, BWT, FWT, FM, MAA and general perplexity.

    Rows are the newest non-rejected version of every task, in commit order; scores in %.
    """
    from cladapt.evaluation.accuracy_matrix import recorded_rows, square

    store = open_store(registry)
    rows = recorded_rows(store)
    view = square(rows)
    if as_json:
        out = view.to_json()
        out["rows"] = [{"ref": r.ref, "status": r.status, "scores": {t: r.score(t) for t in r.payload.get("scores", {})},
                        "gate": r.gate} for r in rows]
        echo_json(out)
        return
    if not view.tasks:
        console.print("no evaluated versions yet: train with --eval-data FILE (and --eval-on-history)")
        return
    table = Table(title="accuracy matrix R[t][i] (%)")
    for col in ("after", *view.tasks, "ppl"):
        table.add_column(col, justify="right")
    table.add_row("base (b)", *[fixed(v) for v in view.b], fixed(view.ppl_base, 3))
    for k, ref in enumerate(view.refs):
        cells = [f"[bold]{fixed(v)}[/]" if i == k else fixed(v) for i, v in enumerate(view.R[k])]
        table.add_row(ref, *cells, fixed(view.ppl[k], 3))
    console.print(table)
    console.print("  ".join(f"[bold]{k}[/] {fixed(v, 2)}" for k, v in view.summary().items()))
    if show_all:
        full = Table("version", "status", "scores", "gate", title="every evaluated version")
        for r in rows:
            gate = "-" if not r.gate else ("admitted" if r.gate.get("admitted") else "rejected: " + "; ".join(r.gate["reasons"]))
            scores = ", ".join(f"{t} {fixed(r.score(t))}" for t in r.payload.get("scores", {}))
            full.add_row(r.ref, r.status, scores, gate)
        console.print(full)


@click.command("report")
@registry_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="output folder")
def report_cmd(registry: Path | None, out: Path) -> None:
    """Write an HTML report (accuracy heatmap, curves, forgetting split, gate decisions) into OUT."""
    from cladapt.evaluation.report import registry_report_data, write_report

    path = write_report(registry_report_data(open_store(registry)), out)
    console.print(f"report written: {path}")


commands: list[click.Command] = [eval_cmd, history_cmd, report_cmd]
