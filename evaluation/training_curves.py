"""Continual evaluation during training: ``--eval-every N`` (methods.md §11.3, De Lange et al. 2023).

End-of-task evaluation misses the *stability gap*: the transient drop of earlier tasks right after
a task switch, which often recovers before the task ends. A :class:`ContinualEval` plugin scores a
seeded sample of every seen task (``eval.samples`` rows) before the first step, every ``N``
optimizer steps, and after the last one, and stores the curves with the version
(``sidecars/continual_eval.json``) plus, in the manifest metrics, the stability gap and min-ACC of
every earlier task and the WC-ACC curve.

It is an ordinary :class:`~cladapt.adapters.base.TrainingPlugin` (``prepare`` + ``post_step``), so the
trainer needs no change; ``cladapt.train.evaluation_hooks.continual_extension`` adds it to a run. For ``route`` methods only
the task being trained is scored: the other tasks' adapters are not in the model and cannot move.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from cladapt import distributed
from cladapt.adapters.base import Sidecars, TaskSpec, TrainingPlugin
from cladapt.evaluation import metrics as M
from cladapt.evaluation import scoring as E

if TYPE_CHECKING:
    from peft import PeftModel

    from cladapt.adapters.base import History

logger = logging.getLogger(__name__)


class ContinualEval(TrainingPlugin):
    """Scores every seen task every ``every`` optimizer steps (a sample of ``samples`` rows each)."""

    name: ClassVar[str] = "continual-eval"

    def __init__(self, task: str, sets: dict[str, E.EvalSet], every: int, *, tokenizer: Any,
                 max_new_tokens: int | None = None, batch_size: int = 16, precision: str = "no") -> None:
        self.task, self.sets, self.every, self.precision = task, sets, every, precision
        self.tokenizer, self.max_new_tokens, self.batch_size = tokenizer, max_new_tokens, batch_size
        self.step = 0
        self.points: list[dict[str, Any]] = []

    def _measure(self, model: Any, kind: str) -> None:
        if not distributed.is_main():  # several processes: the curves are process 0's (same weights)
            return
        scores = {}
        for t, es in self.sets.items():
            res = E.evaluate(model, self.tokenizer, es, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                             precision=self.precision)
            scores[t] = round(res.score, 4)
        self.points.append({"step": self.step, "task": self.task, "kind": kind, "scores": scores})
        logger.info("continual eval at step %d: %s", self.step, scores)

    def prepare(self, model: PeftModel, task: TaskSpec, history: History) -> None:
        self._measure(model, "start")  # the model before this task: the reference for the stability gap

    def post_step(self, model: PeftModel) -> None:
        self.step += 1
        if self.step % self.every == 0:
            self._measure(model, "step")

    def finalize(self, model: PeftModel, task: TaskSpec) -> Sidecars:
        if not distributed.is_main():  # only process 0 commits
            return Sidecars()
        if not self.points or self.points[-1]["step"] != self.step:
            self._measure(model, "end")
        summary = summarize(self.points, self.task)
        payload = {"every": self.every, "samples": {t: len(es.examples) for t, es in self.sets.items()},
                   "points": self.points, "summary": summary}
        return Sidecars(json={"continual_eval": payload}, metrics={"continual": summary})


def summarize(points: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Stability gap and min-ACC per earlier task, WC-ACC per point (methods.md §11.3)."""
    start = points[0]["scores"]
    during = points[1:]
    earlier = [t for t in start if t != task]
    gap = {t: M.stability_gap(start[t], [p["scores"][t] for p in during]) for t in earlier}
    lowest = {t: min([start[t], *[p["scores"][t] for p in during]]) for t in earlier}
    k = len(earlier) + 1
    worst: list[float] = []
    for n, p in enumerate(during):
        seen = [min([start[t], *[q["scores"][t] for q in during[: n + 1]]]) for t in earlier]
        if task in p["scores"]:
            worst.append(round(M.wc_acc(p["scores"][task], sum(seen) / len(seen) if seen else None, k), 4))
    return {
        "stability_gap": {t: (round(v, 4) if v is not None else None) for t, v in gap.items()},
        "min_acc": round(sum(lowest.values()) / len(lowest), 4) if lowest else None,
        "wc_acc": worst,
    }
