"""Eval-on-history: score a freshly trained version on its own task and on every earlier task.

Runs inside ``train_task``'s ``after_train`` hook, where the training PEFT model is still loaded
and, for sum-composed methods, the earlier adapters are folded into its base weights: the model
with adapter ``default`` on IS the composed model that serving will use. Per composition:

* ``sum`` and ``single``: every task is scored with the model as it is (one model answers all);
* ``route`` (oracle task id): task ``i`` is scored with task ``i``'s own active adapter. Those are
  immutable, so ``R[t][i] = R[i][i]`` and the score recorded by version ``i`` is re-used when its
  key (data sha256, rule, mode, budget) matches.

Besides ``R[t][.]`` the row records ``b[i]`` (base model, every adapter off; computed once per
task and data file, then re-used), the model *before* this version on the new task (for FWT),
and general perplexity. See :mod:`cladapt.evaluation.accuracy_matrix` for the row format.

The run hands over what it already holds (:class:`TrainedModel`: the model, its history, the factors
it folded into the base), so nothing here rebuilds the method or re-reads earlier adapters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cladapt.adapters import METHODS
from cladapt.adapters.base import TRAIN_ADAPTER
from cladapt.budget import DEFAULT_MAX_NEW_TOKENS
from cladapt.evaluation import scoring as E
from cladapt.evaluation.accuracy_matrix import Row, cached_baseline, eval_files, recorded_rows, score_key
from cladapt.evaluation.general_text import general_texts, perplexity
from cladapt.evaluation.progress import EvalProgress
from cladapt.precision import resolve as resolve_precision

if TYPE_CHECKING:
    from cladapt.adapters.base import History
    from cladapt.config import RunConfig
    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """How to score (from ``RunConfig.eval``)."""

    history: bool = True
    mode: str = "generate"
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS  # None: auto (longest label + margin)
    batch_size: int = 16
    limit: int | None = None  # rows per task (seeded sample); None = all
    ppl_files: list[str] | None = None
    ppl_samples: int = 32
    ppl_length: int = 256
    before: bool = True  # also score the model before this version on the new task (R[t-1][t], for FWT)
    precision: str = "no"  # autocast for every forward pass (cladapt.precision); follows train.mixed_precision

    @classmethod
    def from_config(cls, cfg: RunConfig) -> EvalOptions:
        e = cfg.eval
        return cls(
            history=e.on_history, mode=e.mode, max_new_tokens=e.budget, batch_size=e.batch_size,
            limit=e.limit, ppl_files=list(e.ppl_data) if e.ppl_data else None, ppl_samples=e.ppl_samples,
            ppl_length=e.ppl_length, precision=cfg.train.mixed_precision,
        )


@dataclass
class TrainedModel:
    """A version as training leaves it, with what the run already holds about its history.

    ``model`` is the PEFT model with the training adapter active and, for ``sum`` methods, the
    earlier adapters folded into its base weights (``folded`` holds their factors, so the base
    model can be restored for baseline scores); ``history`` is the run's read-only view of the
    earlier versions on this base.
    """

    task: str
    model: Any
    tokenizer: Any
    base_fingerprint: str
    history: History
    folded: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def with_adapter(peft_model: Any, store: Store, ref: str) -> Iterator[None]:
    """Temporarily load registry version ``ref`` next to the training adapter and make it the active one."""
    rec = store.get(ref)
    name = f"eval_{rec.peft_name}"
    peft_model.load_adapter(str(store.adapter_dir(str(rec.ref))), adapter_name=name, is_trainable=False)
    peft_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.set_adapter(TRAIN_ADAPTER)
        peft_model.delete_adapter(name)


@contextmanager
def raw_base(peft_model: Any, folded: list[dict[str, Any]]) -> Iterator[None]:
    """The base model itself: adapters disabled and the folded earlier adapters taken out again.

    Subtracting the fp32 deltas restores the base weights up to rounding (they are copied back
    bit-exactly afterwards); that is ample for a baseline score.
    """
    saved: dict[str, torch.Tensor] = {}
    root = peft_model.get_base_model()
    try:
        with torch.no_grad():
            for adapter in folded:
                for path, f in adapter.items():
                    mod = root.get_submodule(path)
                    layer = getattr(mod, "base_layer", mod)
                    saved.setdefault(path, layer.weight.detach().clone())
                    w = layer.weight
                    w.copy_((w.float() - f.delta().to(w.device)).to(w.dtype))
        with peft_model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for path, original in saved.items():
                mod = root.get_submodule(path)
                getattr(mod, "base_layer", mod).weight.copy_(original)


class HistoryEvaluator:
    """Builds the ``metrics["eval"]`` row of a version being committed (see module docstring)."""

    def __init__(
        self,
        store: Store,
        cfg: RunConfig,
        task: str,
        eval_data: list[str] | None,
        options: EvalOptions,
        *,
        sets: dict[str, E.EvalSet] | None = None,
        composition: str | None = None,
        baseline_cache: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            sets: score exactly these sets (benchmarks: every task of the order, future ones too)
                instead of the recorded eval data.
            composition: override the method's composition (the ``mtl`` baseline is a ``lora``
                adapter that answers every task: ``single``).
            baseline_cache: a shared ``{task|key: result}`` memo of base-model scores (benchmarks
                run one registry per method on the same base and data).
        """
        self.store, self.cfg, self.task, self.options = store, cfg, task, options
        self.eval_data = eval_data
        self.fixed_sets = sets
        self.composition = composition or METHODS.get(cfg.method.name).composition
        self.baseline_cache = baseline_cache
        self._progress = EvalProgress()

    # -------------------------------------------------------------- which data

    def task_files(self, base_fingerprint: str | None) -> dict[str, list[str]]:
        """Held-out files per task to score: earlier tasks first (when on history), this task last."""
        out: dict[str, list[str]] = {}
        if self.options.history:
            for task in self.store.tasks():
                if task == self.task or self.store.active(task) is None:
                    continue
                found = eval_files(self.store, task, base_fingerprint=base_fingerprint)
                missing = [f for f in (found or {}).get("files", []) if not Path(f).exists()]
                if found and not missing:
                    out[task] = list(found["files"])
                elif missing:
                    logger.warning("eval-on-history: task %s's recorded eval data %s is gone; skipped", task, missing)
                else:
                    logger.warning("eval-on-history: task %s has no recorded eval data; skipped", task)
        own = self.eval_data or (eval_files(self.store, self.task, base_fingerprint=base_fingerprint) or {}).get("files")
        if own:
            out[self.task] = list(own)
        return out

    def _sets(self, base_fingerprint: str) -> dict[str, E.EvalSet]:
        if self.fixed_sets is not None:
            return dict(self.fixed_sets)
        files = self.task_files(base_fingerprint)
        return {t: E.load_eval_set(f, task=t, limit=self.options.limit) for t, f in files.items()}

    # -------------------------------------------------------------- scoring

    def _score(self, model: Any, tokenizer: Any, es: E.EvalSet, budget: int, label: str) -> dict[str, Any]:
        rows = len(es.examples) * (2 if self.options.mode == "both" else 1)
        with self._progress.bar(f"{es.task} ({label})", rows) as advance:
            res = E.evaluate(model, tokenizer, es, mode=self.options.mode, max_new_tokens=budget,  # type: ignore[arg-type]
                             batch_size=self.options.batch_size, progress=advance, precision=self.options.precision)
        logger.info("  %s (%s): %s %.2f on %d rows", es.task, label, res.metric, res.score, res.n)
        return res.to_json()

    def _previous_ref(self, trained: TrainedModel) -> str | None:
        """The adapter that served this task before this version, on top of the (folded) base.

        ``route``: the task's active version. ``sum``: the task's active sum version when the task is
        re-trained (the folded base holds every *other* task's adapter). ``single``: the newest
        version of the continued adapter."""
        if self.composition in ("route", "sum"):
            rec = self.store.active(self.task)
            return str(rec.ref) if rec and (self.composition == "route" or rec.composition == "sum") else None
        if self.composition == "single":
            prev = trained.history.latest(self.cfg.method.name)
            return prev.ref if prev else None
        return None

    def __call__(self, trained: TrainedModel) -> dict[str, Any]:
        """The evaluation row of ``trained`` (the ``metrics["eval"]`` payload)."""
        started = time.time()
        fp, tok, peft_model = trained.base_fingerprint, trained.tokenizer, trained.model
        rows = recorded_rows(self.store, base_fingerprint=fp)
        sets = self._sets(fp)
        rule = E.rule(self.options.max_new_tokens or "auto: longest label + 4")
        mode = self.options.mode
        budgets = {t: self.options.max_new_tokens or E.auto_max_new_tokens(tok, es.labels) for t, es in sets.items()}
        precision = resolve_precision(self.options.precision, peft_model.device)

        def key(t: str) -> tuple[Any, ...]:
            es = sets[t]
            entry = {"sha256": es.sha256, "max_new_tokens": budgets[t], "n": len(es.examples), "precision": precision}
            return score_key(entry, rule, mode)

        logger.info("Evaluating %s on %d task(s) (%s, mode %s)", self.task, len(sets), self.composition, mode)
        folded = trained.folded if self.composition == "sum" else []
        with self._progress:
            baseline = {t: self._baseline(trained, rows, t, es, budgets[t], key(t), folded) for t, es in sets.items()}
            scores = {t: self._score_task(trained, rows, t, es, budgets[t], key(t), baseline[t]) for t, es in sets.items()}
            before: dict[str, Any] = {}
            if self.task in sets and self.options.before:
                before[self.task] = self._before(trained, sets[self.task], budgets[self.task], baseline[self.task])
        payload: dict[str, Any] = {
            "rule": rule, "mode": mode, "composition": self.composition, "base_fingerprint": fp,
            "scores": scores, "before": before, "baseline": baseline,
            "eval_data": {t: {"files": es.files, "sha256": es.sha256} for t, es in sets.items() if es.files},
            "ppl": self._ppl(peft_model, tok, rows, folded),
        }
        payload["seconds"] = round(time.time() - started, 2)
        return payload

    def _baseline(
        self, trained: TrainedModel, rows: list[Row], t: str, es: E.EvalSet, budget: int, key: tuple[Any, ...],
        folded: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """b[t]: the base model's score, recorded once per task and key (or memoised across registries)."""
        memo = f"{t}|{key}"
        hit = cached_baseline(rows, t, key) or (self.baseline_cache or {}).get(memo)
        if hit is None:
            with raw_base(trained.model, folded):
                hit = self._score(trained.model, trained.tokenizer, es, budget, "base model")
        if self.baseline_cache is not None:
            self.baseline_cache[memo] = hit
        return hit

    def _score_task(
        self, trained: TrainedModel, rows: list[Row], t: str, es: E.EvalSet, budget: int,
        key: tuple[Any, ...], baseline: dict[str, Any],
    ) -> dict[str, Any]:
        peft_model = trained.model
        if t == self.task or self.composition != "route":
            return {**self._score(peft_model, trained.tokenizer, es, budget, "new model"), "adapters": ["self"]}
        rec = self.store.active(t)
        if rec is None:  # no adapter to route to yet (a later task of a benchmark): the base model answers
            return {**baseline, "adapters": []}
        ref = str(rec.ref)
        own = next((r for r in rows if r.ref == ref), None)
        entry = own.entry(t) if own is not None else None
        if own is not None and entry is not None and own.key(t) == key and entry.get("adapters") == ["self"]:
            logger.info("  %s: oracle route to %s, its recorded score re-used (adapter unchanged)", t, ref)
            return {**entry, "adapters": [ref], "reused_from": ref}
        with with_adapter(peft_model, self.store, ref):
            return {**self._score(peft_model, trained.tokenizer, es, budget, f"route {ref}"), "adapters": [ref]}

    def _before(self, trained: TrainedModel, es: E.EvalSet, budget: int, baseline: dict[str, Any]) -> dict[str, Any]:
        """R[t-1][t]: the model that served this task before this version."""
        ref = self._previous_ref(trained)
        peft_model, tok = trained.model, trained.tokenizer
        if self.composition == "sum" and ref is None:
            with peft_model.disable_adapter():  # the folded earlier adapters alone
                return self._score(peft_model, tok, es, budget, "before")
        if ref is None:
            return {**baseline, "adapters": []}  # nothing served it: the base model answered
        with with_adapter(peft_model, self.store, ref):
            return {**self._score(peft_model, tok, es, budget, f"before ({ref})"), "adapters": [ref]}

    def _ppl(self, peft_model: Any, tok: Any, rows: list[Row], folded: list[dict[str, Any]]) -> dict[str, Any] | None:
        o = self.options
        if not o.ppl_files:
            return None
        texts = general_texts(o.ppl_files, o.ppl_samples)
        digest = E.files_sha256(o.ppl_files)
        info = {"files": list(o.ppl_files), "sha256": digest, "samples": len(texts), "max_length": o.ppl_length,
                "precision": resolve_precision(o.precision, peft_model.device)}
        base = next(
            (
                r.payload["ppl"]["base"]
                for r in reversed(rows)
                if r.payload.get("ppl") and all(r.payload["ppl"].get(k) == v for k, v in info.items() if k != "files")
            ),
            None,
        )
        if base is None:
            with raw_base(peft_model, folded):
                base = perplexity(peft_model, tok, texts, max_length=o.ppl_length, batch_size=o.batch_size,
                                  precision=o.precision)
        value = perplexity(peft_model, tok, texts, max_length=o.ppl_length, batch_size=o.batch_size, precision=o.precision)
        logger.info("  general perplexity %.3f (base model %.3f)", value, base)
        return {**info, "value": round(value, 4), "base": round(float(base), 4)}
