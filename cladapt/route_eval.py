"""Measuring routers: routing accuracy on labelled requests, and task scores when the router chooses.

This module joins the serving side (a :class:`~cladapt.serve.routers.session.RoutingSession`) with
the training side's data loading and scoring (``cladapt.data.rows``, ``cladapt.evaluation.scoring``),
so, like ``cladapt.config``, it sits above both (layer 4); neither ``train/`` nor ``serve/`` imports it.
It is the library behind ``cladapt route eval``, ``cladapt eval --router`` and ``bench/routing.py``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import DataError, Issue
from cladapt.serve.routers.accuracy import RoutingAccuracy, routing_accuracy

if TYPE_CHECKING:
    from cladapt.data.rows import Example
    from cladapt.evaluation.scoring import EvalResult, EvalSet
    from cladapt.serve.routers.base import Route
    from cladapt.serve.routers.session import RoutingSession


@dataclass
class LabelledPrompt:
    """A request with the task it belongs to (and its example, for scoring)."""

    text: str
    task: str
    example: Example | None = None


def benchmark_rows(data_dir: Path, tasks: Sequence[str], *, split: str = "test", instruction: bool = True,
                   limit: int | None = None, seed: int = 0) -> list[LabelledPrompt]:
    """Rows of ``<data_dir>/<task>/<split>.jsonl`` (the CL benchmark pack's layout).

    Args:
        instruction: keep the benchmark's instruction; False routes on the input alone (the
            instructions name the task type, which makes routing easier than real traffic).
        limit: a seeded sample of this many rows per task.
    """
    out: list[LabelledPrompt] = []
    missing = [Issue(str(data_dir / t / f"{split}.jsonl"), "no such file") for t in tasks
               if not (data_dir / t / f"{split}.jsonl").is_file()]
    if missing:
        raise DataError(missing, hint=f"tasks present: {', '.join(sorted(p.name for p in data_dir.iterdir() if p.is_dir()))}")
    for task in tasks:
        examples, inputs = _pack_rows(data_dir / task / f"{split}.jsonl")
        keep = range(len(examples))
        if limit is not None and limit < len(examples):
            keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        for i in keep:
            text = examples[i].prompt_text if instruction else (inputs[i] or examples[i].prompt_text)
            out.append(LabelledPrompt(text, task, examples[i]))
    return out


def _pack_rows(path: Path) -> tuple[list[Example], list[str]]:
    """The pack's ``{"instruction", "input", "output", "task"}`` rows, split on ``\\n`` only.

    Review texts hold U+0085 and U+2028 inside strings; ``str.splitlines`` would cut rows there.
    """
    from cladapt.data.rows import Example, join_prompt

    examples: list[Example] = []
    inputs: list[str] = []
    issues: list[Issue] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = join_prompt(str(row.get("instruction") or ""), str(row.get("input") or ""))
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
        except (ValueError, KeyError, AttributeError) as exc:
            issues.append(Issue(f"{path}:{n}", f"not a benchmark row ({exc})"))
            continue
        examples.append(Example(messages, str(path), n, {"task": row.get("task")}))
        inputs.append(str(row.get("input") or ""))
    if issues:
        raise DataError(issues)
    return examples, inputs


def rows_from_files(files: Sequence[Path], *, task: str | None = None) -> list[LabelledPrompt]:
    """Requests from data files; each row's task is its ``task`` field, else ``task``, else the file stem."""
    from cladapt.data.rows import load_examples

    out = []
    for path in files:
        for ex in load_examples([path]).examples:
            out.append(LabelledPrompt(ex.prompt_text, str(ex.meta.get("task") or task or path.stem), ex))
    return out


@dataclass
class AccuracyRun:
    router: str
    accuracy: RoutingAccuracy
    seconds_per_request: float
    routes: list[Route] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"router": self.router, **self.accuracy.to_json(), "ms_per_request": round(1000 * self.seconds_per_request, 3)}


def route_accuracy(session: RoutingSession, rows: Sequence[LabelledPrompt], *, batch_size: int = 64,
                   progress: Callable[[int], Any] | None = None) -> AccuracyRun:
    """Route every row (in batches; each row on its own) and score the top task against the gold task."""
    routes: list[Route] = []
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        routes += session.route([r.text for r in chunk], task_ids=[r.task for r in chunk])
        if progress:
            progress(len(chunk))
    elapsed = time.perf_counter() - started
    acc = routing_accuracy([r.task for r in rows], [r.task for r in routes])
    return AccuracyRun(session.router.name, acc, elapsed / max(1, len(rows)), routes)


# ------------------------------------------------------------------ task scores under routing


def _subset(evalset: EvalSet, rows: Sequence[int]) -> EvalSet:
    from dataclasses import replace

    return replace(evalset, examples=[evalset.examples[i] for i in rows])


def _combine(task: str, parts: list[tuple[int, EvalResult]]) -> EvalResult:
    """n-weighted means of the parts' percentages (every metric is a mean over rows)."""
    from dataclasses import replace

    n = sum(k for k, _ in parts)
    first = parts[0][1]

    def mean(attr: str) -> float | None:
        vals = [(k, getattr(r, attr)) for k, r in parts]
        return None if any(v is None for _, v in vals) else sum(k * v for k, v in vals) / n

    return replace(first, task=task, n=n, score=mean("score") or 0.0, exact_match=mean("exact_match"),
                   format_rate=mean("format_rate"), rouge_l=mean("rouge_l"), constrained=mean("constrained"),
                   seconds=round(sum(r.seconds for _, r in parts), 2),
                   errors=[e for _, r in parts for e in r.errors][:5])


def evaluate_routed(session: RoutingSession, evalset: EvalSet, routes: Sequence[Route], **kwargs: Any) -> EvalResult:
    """Score ``evalset`` with each row answered under its own route.

    Rows on one adapter are scored together with that adapter on; weighted (JARe) and summed rows
    in batches under :func:`~cladapt.serve.routers.jare.row_weights`; Arrow rows through PEFT's
    Arrow model. ``kwargs`` go to :func:`cladapt.evaluation.scoring.evaluate` (mode, budget, precision).
    """
    from cladapt.evaluation.scoring import evaluate
    from cladapt.features import adapter_on, adapters_off
    from cladapt.serve.routers.jare import applied, plan_of

    batch = int(kwargs.pop("batch_size", 16))
    parts: list[tuple[int, EvalResult]] = []
    single: dict[str, list[int]] = {}
    weighted: list[int] = []
    arrow: list[int] = []
    for i, r in enumerate(routes):
        if r.combine == "arrow":
            arrow.append(i)
        elif plan_of(r, session.peft_names) is not None:
            single.setdefault(r.top or "", []).append(i)
        else:
            weighted.append(i)
    for ref, rows in single.items():
        if ref:
            model, name = session.ensure(ref)
            with adapter_on(model, name):
                parts.append((len(rows), evaluate(model, session.tokenizer, _subset(evalset, rows), batch_size=batch, **kwargs)))
        else:
            with adapters_off(session.model):
                parts.append((len(rows), evaluate(session.model, session.tokenizer, _subset(evalset, rows),
                                                  batch_size=batch, **kwargs)))
    for start in range(0, len(weighted), batch):
        rows = weighted[start : start + batch]
        for ref in {ref for i in rows for ref, _ in routes[i].adapters}:
            session.ensure(ref)
        with applied(session.model, [routes[i] for i in rows], session.peft_names):
            parts.append((len(rows), evaluate(session.model, session.tokenizer, _subset(evalset, rows),
                                              batch_size=len(rows), **kwargs)))
    if arrow:
        model = session.router.model  # type: ignore[attr-defined]
        parts.append((len(arrow), evaluate(model, session.tokenizer, _subset(evalset, arrow), batch_size=batch, **kwargs)))
    return _combine(evalset.task, parts)


def evaluate_with_router(session: RoutingSession, rows: Sequence[LabelledPrompt], **kwargs: Any) -> dict[str, Any]:
    """Task scores per gold task when the router chooses, plus the routing accuracy of the same rows.

    Returns a JSON-ready dict: ``tasks`` (task -> EvalResult JSON + routed-to counts), ``score``
    (row-weighted over tasks), ``routing`` (accuracy, confusion).
    """
    from cladapt.evaluation.scoring import eval_set_from_examples

    run = route_accuracy(session, rows)
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_task.setdefault(r.task, []).append(i)
    tasks: dict[str, Any] = {}
    total = 0.0
    for task, idx in by_task.items():
        es = eval_set_from_examples(task, [rows[i].example for i in idx])  # type: ignore[misc]
        res = evaluate_routed(session, es, [run.routes[i] for i in idx], **kwargs)
        tasks[task] = {**res.to_json(), "routed_to": run.accuracy.confusion[task]}
        total += res.score * len(idx)
    return {"router": session.router.name, "config": session.router.config.model_dump(mode="json"),
            "score": round(total / max(1, len(rows)), 4), "n": len(rows), "tasks": tasks, "routing": run.to_json()}
