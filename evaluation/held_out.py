"""``cladapt eval``: score held-out data on the base, versions or the composed sum, and attach the result.

One entry point (:func:`evaluate_held_out`) loads the base the adapters belong to, applies them
(:func:`cladapt.adapters.loading.load_with_adapters`), scores, and records the result on the
version evaluated as ``evals/<name>.json``.

The record is named after what was evaluated, never after a file: ``eval-<task>``, where the
task is ``--task``, else the rows' ``task`` field, else the evaluated adapter's own task (so
``cladapt eval --adapter sentiment --data sentiment_test.jsonl`` records ``eval-sentiment``, not
``eval-sentiment_test``). ``name`` replaces it (a second evaluation of the same task on other
data, kept beside the first). The base model alone is never recorded: there is no version to
attach it to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import UsageError

if TYPE_CHECKING:
    from cladapt.adapters.loading import Applied
    from cladapt.registry.store import Store


@dataclass
class HeldOut:
    """What ``cladapt eval`` shows: the recorded payload and where it went."""

    payload: dict[str, Any]  # EvalResult.to_json() + plan, rule, base fingerprint
    task: str
    applied: Applied
    recorded_as: str | None  # evaluation name on ``applied.refs[-1]``; None when not recorded


def record_name(task: str, name: str | None = None) -> str:
    """``evals/<name>.json`` of an evaluation: ``name``, else ``eval-<task>`` (validated, at most 64 characters)."""
    from cladapt.registry.refs import validate_name

    return validate_name(name or f"eval-{task}"[:64], what="evaluation name")


def evaluate_held_out(
    store: Store | None,
    data: Sequence[str | Path],
    *,
    adapter: str | None = None,
    compose: str | None = None,
    base_model: str | None = None,
    task: str | None = None,
    split: str | None = None,
    mode: str = "generate",
    max_new_tokens: int | str = "auto",
    limit: int | None = None,
    batch_size: int = 16,
    precision: str = "no",
    record: bool = True,
    name: str | None = None,
    actor: str = "cladapt",
) -> HeldOut:
    """Score ``data`` on the base plus ``adapter`` (one version) or ``compose="sum"``, or the base alone.

    Args:
        max_new_tokens: tokens, or ``"auto"`` (each task's longest label + 4; 50 for free text).
        record: attach the result to the evaluated version (the last ref applied) as
            :func:`record_name` says.

    Raises:
        UsageError: ``name`` without a version to record on.
        DataError, NotFound, IncompatibleBaseModel: before anything is scored or written.
    """
    import torch

    from cladapt.adapters.loading import load_with_adapters
    from cladapt.evaluation.progress import EvalProgress
    from cladapt.evaluation.scoring import evaluate, load_eval_set, rule

    if name and not (adapter or compose):
        raise UsageError("--name names a record on a version: give --adapter or --compose")
    own_task = store.get(adapter).task if store is not None and adapter else None
    evalset = load_eval_set(list(data), task=task, limit=limit, split=split, default_task=own_task)
    budget = None if max_new_tokens == "auto" else int(max_new_tokens)
    device = "cuda" if torch.cuda.is_available() else None
    with load_with_adapters(store, adapters=[adapter] if adapter else [], compose=compose, base_model=base_model,
                            device=device) as (model, tok, info, applied):
        rows = len(evalset.examples) * (2 if mode == "both" else 1)
        with EvalProgress().bar(evalset.task, rows) as progress:
            res = evaluate(model, tok, evalset, mode=mode, max_new_tokens=budget, batch_size=batch_size,  # type: ignore[arg-type]
                           progress=progress, precision=precision)
    payload = {**res.to_json(), "plan": applied.to_json(), "rule": rule(budget or "auto: longest label + 4"),
               "base_fingerprint": info.fingerprint}
    recorded_as = None
    if record and store is not None and applied.refs:
        recorded_as = record_name(evalset.task, name)
        store.add_evaluation(applied.refs[-1], recorded_as, payload, actor=actor)
    return HeldOut(payload, evalset.task, applied, recorded_as)
