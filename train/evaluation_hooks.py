"""How a run calls evaluation: the ``--eval-every`` extension and the ``after_train`` hook (score + gate).

Training uses evaluation, never the other way round: :mod:`cladapt.evaluation` scores a
:class:`~cladapt.evaluation.history_eval.TrainedModel` and returns an
:class:`~cladapt.evaluation.gate.Admission`; this module builds both from what the run holds, and
:func:`cladapt.train.run.train_task` commits the version with the admission's status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.adapters import METHODS
from cladapt.errors import ConfigError, DataError, Issue
from cladapt.evaluation import scoring as E
from cladapt.evaluation.accuracy_matrix import eval_files
from cladapt.evaluation.gate import Admission, GatePolicy, admit, load_policy
from cladapt.evaluation.history_eval import EvalOptions, HistoryEvaluator, TrainedModel
from cladapt.evaluation.training_curves import ContinualEval

if TYPE_CHECKING:
    from cladapt.config import RunConfig
    from cladapt.registry.store import Store
    from cladapt.train.run import RunContext

logger = logging.getLogger(__name__)

#: scores a freshly trained version: the evaluation row (``metrics["eval"]``);
#: :class:`~cladapt.evaluation.history_eval.HistoryEvaluator` is the standard one
Evaluator = Callable[[TrainedModel], dict[str, Any]]
#: called once after training, before staging: the version's admission, or None to commit it as trained
AfterTrain = Callable[[TrainedModel], "Admission | None"]


def continual_extension(
    store: Store, cfg: RunConfig, task: str, eval_data: list[str] | None
) -> Callable[[RunContext], None] | None:
    """A run extension adding :class:`ContinualEval`, or None when ``cfg.eval.every`` is 0."""
    if cfg.eval.every <= 0:
        return None

    def extend(ctx: RunContext) -> None:
        options = EvalOptions(history=METHODS.get(cfg.method.name).composition != "route")
        files = HistoryEvaluator(store, cfg, task, eval_data, options).task_files(ctx.base.fingerprint)
        if not files:
            logger.warning("--eval-every: no eval data for %s or any earlier task; continual evaluation is off", task)
            return
        sets = {t: E.load_eval_set(f, task=t, limit=cfg.eval.samples, seed=cfg.train.seed) for t, f in files.items()}
        ctx.plugins.append(ContinualEval(task, sets, cfg.eval.every, tokenizer=ctx.tokenizer,
                                         max_new_tokens=cfg.eval.budget, batch_size=cfg.eval.batch_size,
                                         precision=cfg.train.mixed_precision))

    return extend


def scored(evaluator: Evaluator, policy: GatePolicy | None, store: Store) -> AfterTrain:
    """The ``after_train`` hook scoring with ``evaluator`` and gating the row with ``policy`` (None: record only)."""

    def after_train(trained: TrainedModel) -> Admission:
        return admit(evaluator(trained), policy, store, task=trained.task, base_fingerprint=trained.base_fingerprint)

    return after_train


def make_after_train(store: Store, cfg: RunConfig, task: str, eval_data: list[str] | None) -> AfterTrain | None:
    """The ``after_train`` hook for ``train_task``: evaluate, record the row, apply the gate.

    Evaluation runs when ``cfg.eval.on_history`` is set, when ``eval_data`` is given, or when a
    gate policy is set (a gate with ``max_drop`` implies eval-on-history). Returns None when none
    of these applies.

    Raises:
        ConfigError: the gate needs the new task's score but no eval data is given or recorded for it.
        DataError: an eval or perplexity file is missing or malformed (before any training).
    """
    policy = load_policy(store)
    options = EvalOptions.from_config(cfg)
    if policy is not None and policy.max_drop is not None:
        options.history = True
    if policy is not None and policy.max_ppl_rise is not None and not options.ppl_files:
        options.ppl_files = list(policy.ppl_data or [])
    if not (options.history or eval_data or policy is not None):
        return None
    if eval_data:
        from cladapt.data.rows import load_examples

        load_examples(eval_data)  # a bad eval file must fail now, not after training
    gone = [f for f in options.ppl_files or [] if not Path(f).is_file()]
    if gone:
        raise DataError([Issue(f, "general-text file for perplexity not found") for f in gone],
                        hint="fix eval.ppl_data, or `cladapt gate set --ppl-data FILE`")
    if policy is not None and policy.min_score is not None and not eval_data and not eval_files(store, task):
        raise ConfigError(
            [Issue(f"task {task}", "the gate's min_score needs this task's held-out data, and none is recorded")],
            hint=f"pass --eval-data FILE to `cladapt train --task {task}`",
        )
    return scored(HistoryEvaluator(store, cfg, task, eval_data, options), policy, store)


def after_train_for(
    store: Store, cfg: RunConfig, task: str, eval_data: list[str] | None, *, evaluator: Evaluator | None,
    forgetting: bool,
) -> AfterTrain | None:
    """What a run does after training: the config's evaluation and gate, or ``evaluator``'s row, gated.

    A forgetting version is meant to lose a task: it is evaluated as configured but never gated
    (the gate's ``max_drop`` would reject every success).
    """
    if evaluator is None and not forgetting:
        return make_after_train(store, cfg, task, eval_data)
    if evaluator is None and (cfg.eval.on_history or eval_data):
        evaluator = HistoryEvaluator(store, cfg, task, eval_data, EvalOptions.from_config(cfg))
    if evaluator is None:
        return None
    return scored(evaluator, None if forgetting else load_policy(store), store)
