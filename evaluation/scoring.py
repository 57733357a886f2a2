"""Scoring a model on a task's held-out data (methods.md §11.5 and §4.3).

Three views of the same answers, so superficial and essential forgetting can be told apart:

* **strict** (the ``R`` matrix): greedy generation through the chat template, then O-LoRA's exact
  match: lowercase, remove ASCII punctuation, collapse whitespace (articles kept), string equality;
* **format rate**: the share of generations that normalise to *some* label of the task;
* **constrained** accuracy: ``argmax_l log p(answer_l | prompt)`` over the label set, where
  ``answer_l`` is exactly the assistant segment the trainer learns (label + end-of-turn tokens of
  the chat template), summed over its tokens. Format-independent, so a drop here is knowledge lost.

Generative tasks (many distinct answers) are scored with ROUGE-L F1 (``rouge-score``) instead of
exact match, and have no format rate or constrained mode. Scores are percentages.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cladapt.budget import DEFAULT_MAX_NEW_TOKENS
from cladapt.data.rows import Example, load_examples
from cladapt.errors import ConfigError, DataError, Issue
from cladapt.evaluation.label_scores import label_logprobs
from cladapt.precision import autocast
from cladapt.precision import resolve as resolve_precision
from cladapt.text.generation import generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Mode = Literal["generate", "constrained", "both"]
Progress = Callable[[int], Any]

#: identifies the scoring rule; stored with every score so incompatible numbers are never mixed
RULE_ID = "cladapt-eval-1"
_PUNCT = str.maketrans("", "", string.punctuation)
_SPACE = re.compile(r"\s+")


def rule(max_new_tokens: int | str) -> dict[str, Any]:
    """The scoring rule as recorded in the registry next to every ``R`` row."""
    return {
        "id": RULE_ID,
        "exact_match": "lowercase, remove ASCII punctuation, collapse whitespace (articles kept); equality (O-LoRA)",
        "generation": "greedy, chat template, left padding",
        "max_new_tokens": max_new_tokens,
        "constrained": "argmax over labels of the summed log-likelihood of the trained answer segment",
        "generative": "ROUGE-L F1 (rouge-score, no stemming) when a task has many distinct answers",
    }


def normalize(text: str) -> str:
    """O-LoRA's answer normalisation (methods.md §11.5)."""
    return _SPACE.sub(" ", text.lower().translate(_PUNCT)).strip()


def exact_match(prediction: str, label: str) -> bool:
    return normalize(prediction) == normalize(label)


# ------------------------------------------------------------------ evaluation data


@dataclass
class EvalSet:
    """One task's held-out examples and what is needed to score them."""

    task: str
    examples: list[Example]
    files: list[str] = field(default_factory=list)
    sha256: str = ""
    labels: list[str] | None = None  # the label set (classification); None = generative

    @property
    def kind(self) -> str:
        return "classification" if self.labels else "generative"


def is_classification(answers: Sequence[str]) -> bool:
    """Few distinct answers relative to the rows (and at most 50) means a label set."""
    distinct = {normalize(a) for a in answers}
    return len(distinct) <= min(50, max(1, len(answers) // 2))


def load_eval_set(
    path: str | Path | Sequence[str | Path],
    *,
    task: str | None = None,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    split: str | None = None,
    default_task: str | None = None,
) -> EvalSet:
    """Load held-out data (any source ``cladapt train`` accepts: files, dataset folders and names).

    Args:
        task: the task the rows belong to; else the rows' ``task`` field, else ``default_task``
            (the evaluated adapter's), else the first file's name.
        labels: the task's label set; default: the distinct answers, if they look like labels.
        limit: keep a seeded random sample of this many rows (file order is kept).
        split: the split of dataset folders and names given without ``:SPLIT`` (default train).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError([Issue("limit", f"must be a positive number of rows, got {limit!r}")])
    sources = [path] if isinstance(path, (str, Path)) else list(path)
    data = load_examples(sources, split=split)
    examples = data.examples
    if limit is not None and limit < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    answers = [ex.answer for ex in data.examples]
    label_set = list(labels) if labels else (sorted(set(answers)) if is_classification(answers) else None)
    name = task or str(data.examples[0].meta.get("task") or default_task or Path(sources[0]).stem)
    files = data.manifest_data()["files"]
    local = all(Path(p).is_file() for p in sources)
    return EvalSet(name, examples, files, files_sha256(sources) if local else data.sha256, label_set)


def files_sha256(paths: Sequence[str | Path]) -> str:
    """sha256 of the files' bytes (one file: its plain sha256), to tell whether eval data changed."""
    if len(paths) == 1:
        return hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


def eval_set_from_examples(task: str, examples: list[Example], labels: Sequence[str] | None = None) -> EvalSet:
    answers = [ex.answer for ex in examples]
    label_set = list(labels) if labels else (sorted(set(answers)) if is_classification(answers) else None)
    blob = json.dumps([ex.messages for ex in examples], sort_keys=True).encode()
    return EvalSet(task, examples, [], hashlib.sha256(blob).hexdigest(), label_set)


def auto_max_new_tokens(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str] | None, *, margin: int = 4) -> int:
    """Longest label in tokens + ``margin``: classification answers are short, and decoding past that
    can only turn a would-be exact match into a miss if the model adds text after ``margin`` tokens
    of punctuation/space. Generative tasks keep the spec's 50 (:data:`cladapt.budget.DEFAULT_MAX_NEW_TOKENS`)."""
    if not labels:
        return DEFAULT_MAX_NEW_TOKENS
    return max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels) + margin


# ------------------------------------------------------------------ scoring


@dataclass
class EvalResult:
    """Scores of one model on one task (percentages)."""

    task: str
    n: int
    kind: str
    mode: str
    score: float  # the R-matrix score: exact match (classification) or ROUGE-L (generative)
    metric: str
    exact_match: float | None = None
    format_rate: float | None = None
    rouge_l: float | None = None
    constrained: float | None = None
    max_new_tokens: int | None = None
    precision: str = "no"  # mixed precision the forward passes ran under (cladapt.precision)
    files: list[str] = field(default_factory=list)
    sha256: str = ""
    seconds: float = 0.0
    errors: list[dict[str, str]] = field(default_factory=list)  # a few misses, for eyeballing

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    evalset: EvalSet,
    *,
    mode: Mode = "generate",
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    progress: Progress | None = None,
    precision: str = "no",
) -> EvalResult:
    """Score ``model`` (already carrying whatever adapters the plan needs) on ``evalset``.

    Args:
        max_new_tokens: ``None`` picks :func:`auto_max_new_tokens` for the task's labels.
        progress: called with the number of rows finished after every batch (per pass).
        precision: autocast for the forward passes (``no``, ``bf16``, ``fp16``, ``auto``); recorded with
            the score, since bf16 and fp32 answers can differ on near-ties.
    """
    if not evalset.examples:
        raise DataError([Issue(",".join(evalset.files) or evalset.task, "no rows to evaluate")])
    started = time.time()
    was_training = model.training
    model.eval()
    convs = [ex.prompt_messages for ex in evalset.examples]
    golds = [ex.answer for ex in evalset.examples]
    labels = evalset.labels
    n = len(golds)
    budget = max_new_tokens or auto_max_new_tokens(tokenizer, labels)
    resolved = resolve_precision(precision, model.device)
    res = EvalResult(evalset.task, n, evalset.kind, mode, 0.0, "exact_match", max_new_tokens=budget,
                     precision=resolved, files=list(evalset.files), sha256=evalset.sha256)
    try:
        with autocast(resolved, model.device):
            if mode in ("generate", "both") or not labels:
                preds = generate(model, tokenizer, convs, max_new_tokens=budget, batch_size=batch_size, progress=progress)
                hits = [exact_match(p, g) for p, g in zip(preds, golds, strict=True)]
                res.exact_match = 100.0 * sum(hits) / n
                res.errors = [{"gold": g, "pred": p} for p, g, h in zip(preds, golds, hits, strict=True) if not h][:5]
                if labels:
                    names = {normalize(label) for label in labels}
                    res.format_rate = 100.0 * sum(normalize(p) in names for p in preds) / n
                    res.score = res.exact_match
                else:
                    res.rouge_l = rouge_l(preds, golds)
                    res.score, res.metric = res.rouge_l, "rougeL"
            if labels and mode in ("constrained", "both"):
                lps = label_logprobs(model, tokenizer, convs, labels, batch_size=batch_size, progress=progress)
                chosen = [labels[max(range(len(labels)), key=row.__getitem__)] for row in lps]
                res.constrained = 100.0 * sum(exact_match(c, g) for c, g in zip(chosen, golds, strict=True)) / n
                if mode == "constrained":
                    res.score, res.metric = res.constrained, "constrained"
    finally:
        model.train(was_training)
    res.seconds = round(time.time() - started, 2)
    return res


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 in %."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    values = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(values) / max(1, len(values))
