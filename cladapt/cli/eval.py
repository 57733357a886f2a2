"""Evaluation and governance commands: eval, history, gate, promote, rollback, log, report, bench cl."""

from __future__ import annotations

import getpass
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cladapt.cli import route as route_cli
from cladapt.cli.common import config_options, console, echo_json, open_store, registry_option


def _actor() -> str:
    try:
        return os.environ.get("CLADAPT_ACTOR") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cladapt"


def _n(v: Any, digits: int = 1) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


# ------------------------------------------------------------------ eval


@click.command("eval")
@registry_option
@click.option("--adapter", "adapter", default=None, metavar="REF", help="one registry version (task, task@N)")
@click.option("--compose", type=click.Choice(["sum"]), default=None, help="every active sum-composed adapter at once")
@click.option("--data", "data", required=True, multiple=True, type=click.Path(exists=True, path_type=Path),
              help="held-out data (.jsonl/.json/.csv/...; repeatable)")
@click.option("--task", default=None, help="task name the data belongs to [default: the rows' task field or file name]")
@click.option("--mode", type=click.Choice(["generate", "constrained", "both"]), default="generate", show_default=True,
              help="strict exact match on greedy answers, log-likelihood choice among the labels, or both")
@click.option("--max-new-tokens", default="50", show_default=True, help="generation budget, or 'auto' (longest label + 4)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="score a seeded sample of this many rows")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16", "auto"]), default="no", show_default=True,
              help="autocast the forward passes (auto: bf16 where the hardware has it); recorded with the score")
@click.option("--base-model", default=None, help="[default: the one the adapter was trained on]")
@click.option("--record/--no-record", default=True, show_default=True,
              help="attach the result to the evaluated version (evals/eval-<task>.json)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--router", default=None, help="route every row without a task id and score the routed answers")
@route_cli.router_options
def eval_cmd(registry: Path | None, adapter: str | None, compose: str | None, data: tuple[Path, ...], task: str | None,
             mode: str, max_new_tokens: str, limit: int | None, batch_size: int, mixed_precision: str,
             base_model: str | None, record: bool,
             as_json: bool, router: str | None, settings: tuple[str, ...], top_k: int | None, compositions: str) -> None:
    """Score the base model, one adapter, the composed sum, or routed adapters on held-out data.

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
    from cladapt.adapters.loading import attach, attach_sum
    from cladapt.base_model import DEFAULT_BASE_MODEL, load
    from cladapt.evaluation.progress import EvalProgress
    from cladapt.evaluation.scoring import evaluate, load_eval_set, rule

    if adapter and compose:
        raise click.UsageError("--adapter and --compose are alternatives")
    budget = None if max_new_tokens == "auto" else int(max_new_tokens)
    store = open_store(registry) if (adapter or compose) else None
    rec = store.get(adapter) if store and adapter else None
    if store and compose and base_model is None:
        sums = [r for r in store.list() if r.status == "active" and r.composition == "sum"]
        base_model = sums[-1].manifest.base_model.get("id") if sums else None
    import torch

    model, tok, info = load(base_model or (rec.manifest.base_model.get("id") if rec else None) or DEFAULT_BASE_MODEL,
                            device="cuda" if torch.cuda.is_available() else None)
    es = load_eval_set(list(data), task=task, limit=limit)
    plan: dict[str, Any] = {"composition": "base", "refs": []}
    with tempfile.TemporaryDirectory() as scratch:
        if rec is not None:
            model, _ = attach(model, store, info, [f"{rec.task}@{rec.version}"])  # type: ignore[arg-type]
            plan = {"composition": "adapter", "refs": [f"{rec.task}@{rec.version}"]}
        elif compose and store is not None:
            model, refs = attach_sum(model, store, info, Path(scratch) / "sum")
            plan = {"composition": "sum", "refs": refs}
        with EvalProgress().bar(es.task, len(es.examples) * (2 if mode == "both" else 1)) as progress:
            res = evaluate(model, tok, es, mode=mode, max_new_tokens=budget, batch_size=batch_size,  # type: ignore[arg-type]
                           progress=progress, precision=mixed_precision)
    payload = {**res.to_json(), "plan": plan, "rule": rule(budget or "auto: longest label + 4"), "base_fingerprint": info.fingerprint}
    target = plan["refs"][-1] if plan["refs"] else None
    if record and store is not None and target:
        from cladapt.registry.refs import validate_name

        store.add_evaluation(target, validate_name(f"eval-{es.task}"[:64], what="evaluation name"), payload, actor=_actor())
    if as_json:
        echo_json(payload)
        return
    console.print(f"[bold]{es.task}[/] ({es.kind}, {res.n} rows, plan {plan['composition']} {plan['refs'] or ''})")
    table = Table("metric", "value")
    for key in ("score", "exact_match", "format_rate", "constrained", "rouge_l", "max_new_tokens", "precision", "seconds"):
        if payload.get(key) is not None:
            table.add_row(key, _n(payload[key], 2))
    console.print(table)
    if record and target:
        console.print(f"recorded on {target} as eval-{es.task}")


def _eval_routed(registry: Path | None, router: str, settings: tuple[str, ...], top_k: int | None, compositions: str,
                 data: tuple[Path, ...], task: str | None, mode: str, max_new_tokens: str, limit: int | None,
                 batch_size: int, precision: str, base_model: str | None, as_json: bool) -> None:
    import random

    from cladapt.route_eval import evaluate_with_router, rows_from_files

    session = route_cli.session_for(registry, router, settings, top_k, compositions, base_model)
    rows = rows_from_files(list(data), task=task)
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
        table.add_row(name, str(res["n"]), _n(res["score"], 2), _n(out["routing"]["per_task"].get(name), 1), routed)
    console.print(table)
    console.print(f"score {out['score']:.2f} over {out['n']} rows; routing accuracy {out['routing']['accuracy']:.2f}% "
                  f"(merged groups {out['routing']['accuracy_merged']:.2f}%)", highlight=False)


# ------------------------------------------------------------------ history


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
    table.add_row("base (b)", *[_n(v) for v in view.b], _n(view.ppl_base, 3))
    for k, ref in enumerate(view.refs):
        cells = [f"[bold]{_n(v)}[/]" if i == k else _n(v) for i, v in enumerate(view.R[k])]
        table.add_row(ref, *cells, _n(view.ppl[k], 3))
    console.print(table)
    console.print("  ".join(f"[bold]{k}[/] {_n(v, 2)}" for k, v in view.summary().items()))
    if show_all:
        full = Table("version", "status", "scores", "gate", title="every evaluated version")
        for r in rows:
            gate = "-" if not r.gate else ("admitted" if r.gate.get("admitted") else "rejected: " + "; ".join(r.gate["reasons"]))
            scores = ", ".join(f"{t} {_n(r.score(t))}" for t in r.payload.get("scores", {}))
            full.add_row(r.ref, r.status, scores, gate)
        console.print(full)


# ------------------------------------------------------------------ gate, promote, rollback, log


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
    save_policy(store, policy, actor=_actor())
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

    save_policy(open_store(registry), None, actor=_actor())
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

    rec = promote(open_store(registry), ref, actor=_actor(), reason=reason)
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
    rec = rollback(store, task, actor=_actor(), reason=reason)
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


@click.command("report")
@registry_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="output folder")
def report_cmd(registry: Path | None, out: Path) -> None:
    """Write an HTML report (accuracy heatmap, curves, forgetting split, gate decisions) into OUT."""
    from cladapt.evaluation.report import registry_report_data, write_report

    path = write_report(registry_report_data(open_store(registry)), out)
    console.print(f"report written: {path}")


# ------------------------------------------------------------------ bench


@click.group("bench")
def bench_group() -> None:
    """Benchmarks (results go to bench/results/ with machine, versions and command)."""


@bench_group.command("cl")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="CL benchmark folder with manifest.json (e.g. ../shared/data/cl-benchmark)")
@click.option("--order", default="order1", show_default=True, help="a task order named in the manifest")
@click.option("--profile", type=click.Choice(["smoke", "quick", "small", "full"]), default="small", show_default=True,
              help="smoke: 16 rows, 2 steps; quick: 160/60 rows; small: 300/100 rows; full: all rows")
@click.option("--methods", default="lora,seq-lora,inc-lora,olora,mtl", show_default=True,
              help="comma-separated; a method may carry variants: seq-lora+asd, olora+gere-lf, reglora+preset")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"), show_default=True)
@click.option("--base-model", default=None)
@click.option("--mode", type=click.Choice(["generate", "constrained", "both"]), default=None,
              help="override the profile's scoring mode")
@click.option("--max-new-tokens", type=int, default=None, help="override the profile's generation budget")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/work"), show_default=True,
              help="scratch: sampled data and one registry per method, kept for resuming")
@click.option("--fresh", is_flag=True, help="discard earlier results and registries of this order and profile")
@click.option("--ppl-data", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="general text (JSON Lines with 'text') for the general-perplexity column; added to finished cells too")
@click.option("--ppl-samples", type=click.IntRange(min=1), default=64, show_default=True, help="texts used for general perplexity")
@click.option("--replay-data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="general texts replayed by the +gere-<loss> method variants (e.g. seq-lora+gere-lf)")
@config_options
def bench_cl(data_dir: Path, order: str, profile: str, methods: str, out: Path, base_model: str | None, mode: str | None,
             max_new_tokens: int | None, work_dir: Path, fresh: bool, ppl_data: tuple[Path, ...], ppl_samples: int,
             replay_data: Path | None, configs: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Continual-learning benchmark: train every method over an order, score every task after each.

    \b
    cladapt bench cl --data-dir ../shared/data/cl-benchmark --order order1 --profile small --methods lora,olora,mtl \\
        --ppl-data ../shared/data/general-replay/c4.jsonl

    Every cell trains LoRA on q_proj,v_proj at r 8 (equal budgets); +preset keeps the method preset's own
    shape (reglora+preset: all linear layers). Methods take data-pipeline variants: seq-lora+asd,
    olora+gere-lf (with --replay-data), inc-lora+asd+gere-tm. Each cell runs in its own process.
    Resumable: finished (order, method) cells and finished tasks inside a cell are reused.
    """
    import shlex
    import sys
    from dataclasses import replace

    from cladapt.bench.cl import run_bench
    from cladapt.bench.cl_spec import PROFILES, BenchSpec, lora_label

    if configs:
        raise click.UsageError("bench cl takes --set overrides only (the profile is the config)")
    prof = PROFILES[profile]
    if mode:
        prof = replace(prof, mode=mode)
    if max_new_tokens:
        prof = replace(prof, max_new_tokens=max_new_tokens)
    spec = BenchSpec(data_dir, order, prof, [m.strip() for m in methods.split(",") if m.strip()], out,
                     base_model=base_model, overrides=list(overrides), fresh=fresh, work=work_dir,
                     ppl_files=list(ppl_data), ppl_samples=ppl_samples, replay_data=replay_data, command=shlex.join(sys.argv))
    path = run_bench(spec)
    results = json.loads(path.read_text())
    table = Table("method", "LoRA", "AA", "LA", "BWT", "FWT", "FM", "AA (constrained)", "ppl (base)", "train s", "eval s",
                  title=f"{order} ({profile}): {' -> '.join(results['tasks'])}")
    for m in spec.methods:
        cell = results["cells"].get(m) or {}
        met, con = cell.get("metrics") or {}, cell.get("metrics_constrained") or {}
        ppl = f"{cell['ppl'][-1]:.2f} ({cell['ppl_base']:.2f})" if cell.get("ppl") else "–"
        shape = lora_label(cell["config"]["lora"]) if cell.get("config") else cell.get("status", "–")
        table.add_row(m, shape, *[_n(met.get(k), 2) for k in ("AA", "LA", "BWT", "FWT", "FM")], _n(con.get("AA"), 2), ppl,
                      _n(cell.get("train_seconds")), _n(cell.get("eval_seconds")))
    console.print(table)
    console.print(f"results: {path}\nreport: {path.with_suffix('')}/index.html")


commands: list[click.Command] = [eval_cmd, history_cmd, gate_group, promote_cmd, rollback_cmd, log_cmd, report_cmd, bench_group]
