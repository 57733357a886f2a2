"""Answer-style diversification (ASD; SEFE, Chen et al., ICML 2025; methods.md §4.1).

What it changes: the task's *data*. ``X`` % of the rows (default 20) are rewritten into the four
answer styles the task does not natively use, in equal shares, so that every task's training set
holds the same mixture of styles and a later task cannot drag the model into its single style
(superficial forgetting). The other rows are left byte-identical. Styles:

=====  ==============================================  =========================================
style  new user turn                                   new answer
=====  ==============================================  =========================================
SA     ``q`` + RFP                                     ``g``
MCQ    ``q`` + options ``A. ..`` (g + 3 distractors)   the letter of ``g``
YN     ``q`` + ``Is the answer "c"?`` + RFP            ``Yes`` / ``No`` (c = g with prob. 0.5)
BE     ``q`` + RFP                                     ``g. <explanation of ~20 words>``
DE     ``q`` + RFP                                     ``g. <explanation of ~50 words>``
=====  ==============================================  =========================================

Persists ``asd.json`` per task version (seed, X, per-style counts, skipped rows, RFPs, generator
id); the converted data is reproducible from it and is not stored.

Choices where methods.md is silent **[cladapt]**:

* ``q`` is the last user turn; the RFP goes on its own line at the end of it. Rows that are not
  converted are not touched (no RFP), so ``X = 0`` is the identity.
* Every random choice of a row (distractors, option order, the YN candidate) uses its own
  ``random.Random(f"asd:{seed}:{row}")``, so editing one row cannot change another row's conversion.
* Label set ``L``: ``labels`` if given; else the task's distinct answers (deduplicated after
  normalisation, first spelling kept, sorted). The report calls it "classification" when answers
  repeat (distinct answers <= half the rows), else "pool" (the other rows' answers); both are used
  the same way. Candidates longer than 64 tokens are left out of ``L``.
* Rows that cannot be converted keep their original style (no replacement row is drawn), and are
  reported with file, line and reason. A generator that *raises* is a bug and propagates; one that
  returns nothing usable for a row is a per-row "generator failure".
* Without a tokenizer (``count_tokens=None``) the 64-token gold limit counts whitespace words.
* Explanations are flattened to one paragraph and cut at the last sentence end; one that names
  another label but not the gold, copies the question, or loops is a generator failure (a 135M
  base model often does all three), so BE/DE targets never contradict their own answer.
* BE/DE grading accepts a reply that starts with the gold answer followed by a period, newline or
  the end, so golds that contain a period ("St. Louis") stay gradeable.
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from cladapt.data.rows import Example
from cladapt.train.asd_explain import (
    Generator,
    base_model_generator,
    explanation_problem,
    explanations_for,
    normalize_answer,
)

if TYPE_CHECKING:
    from cladapt.config import AsdSettings
    from cladapt.train.run import RunContext, RunExtension

logger = logging.getLogger(__name__)

STYLES = ("YN", "MCQ", "SA", "BE", "DE")
#: response format prompts (methods.md §4.1; the MCQ one is SEFE's, the others cladapt's)
RFP = {
    "SA": "Answer the question using a single word or phrase.",
    "MCQ": "Answer with the option's letter from the given choices directly.",
    "YN": "Answer yes or no.",
    "BE": "Answer, then explain briefly.",
    "DE": "Answer, then explain in detail.",
}
MAX_GOLD_TOKENS = 64
MCQ_OPTIONS = 4


@dataclass(frozen=True)
class Skipped:
    where: str  # file:line
    style: str
    reason: str


@dataclass
class AsdReport:
    """What ASD did to one task; serialised as the ``asd.json`` sidecar."""

    seed: int
    percent: float
    original_style: str
    rows: int
    generator: str
    requested: dict[str, int]
    counts: dict[str, int]
    skipped: list[Skipped] = field(default_factory=list)
    redistributed: dict[str, list[str]] | None = None
    label_set: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rfps"] = {s: RFP[s] for s in STYLES}
        out["converted"] = sum(self.counts.values())
        return out


@dataclass
class AsdResult:
    examples: list[Example]
    report: AsdReport


def target_styles(original_style: str, *, with_explanations: bool) -> list[str]:
    """The styles converted rows are spread over (BE/DE only with an explanation generator)."""
    pool = STYLES if with_explanations else ("YN", "MCQ", "SA")
    return [s for s in pool if s != original_style]


def plan(n: int, percent: float, seed: int, styles: Sequence[str]) -> dict[int, str]:
    """Row index -> style for the ``round(n * percent / 100)`` converted rows, equal shares ±1."""
    rng = random.Random(seed)
    chosen = rng.sample(range(n), round(n * percent / 100))
    rng.shuffle(chosen)
    return {row: styles[k % len(styles)] for k, row in enumerate(chosen)}


def label_set(
    examples: Sequence[Example], labels: Sequence[str] | None, count_tokens: Callable[[str], int], max_tokens: int
) -> tuple[list[str], dict[str, Any]]:
    """The candidate answers ``L`` (distinct after normalisation, sorted) and a description."""
    source = list(labels) if labels is not None else [ex.answer for ex in examples]
    first: dict[str, str] = {}
    for a in source:
        key = normalize_answer(a)
        if key and key not in first:
            first[key] = a
    distinct = sorted(first.values())
    kind = "given" if labels is not None else ("classification" if len(distinct) <= len(examples) / 2 else "pool")
    usable = [a for a in distinct if count_tokens(a) <= max_tokens]
    return usable, {"kind": kind, "size": len(usable), "too_long": len(distinct) - len(usable)}


def _with_user_turn(ex: Example, content: str, answer: str, meta: dict[str, Any]) -> Example:
    msgs = [dict(m) for m in ex.messages]
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last_user]["content"] = content
    msgs[-1]["content"] = answer
    return Example(msgs, ex.file, ex.line, meta)


def _meta(ex: Example, style: str, gold: str, info: dict[str, Any]) -> dict[str, Any]:
    """Converted-row metadata: ``gold``/``style`` at the top, grading details under meta.asd."""
    inner = dict(ex.meta.get("meta") or {}) if isinstance(ex.meta.get("meta"), dict) else {}
    inner["asd"] = info
    return {**ex.meta, "gold": gold, "style": style, "meta": inner}


def _convert(
    ex: Example, style: str, rng: random.Random, candidates: list[str], explanation: str | None
) -> tuple[Example | None, str | None]:
    """(converted example, None) or (None, reason)."""
    g = ex.answer
    q = ex.prompt_text.rstrip()
    others = [c for c in candidates if normalize_answer(c) != normalize_answer(g)]
    if style in ("MCQ", "YN") and not others:
        return None, f"fewer than 2 distinct candidate answers for {style}"
    if style == "MCQ":
        options = [g, *rng.sample(others, min(MCQ_OPTIONS - 1, len(others)))]
        rng.shuffle(options)
        letters = string.ascii_uppercase[: len(options)]
        letter = letters[options.index(g)]
        listing = "\n".join(f"{k}. {o}" for k, o in zip(letters, options, strict=True))
        info = {"target": letter, "options": options, "letter": letter}
        return _with_user_turn(ex, f"{q}\n{listing}\n{RFP['MCQ']}", letter, _meta(ex, style, g, info)), None
    if style == "YN":
        candidate = g if rng.random() < 0.5 else rng.choice(others)
        target = "Yes" if candidate == g else "No"
        info = {"target": target, "candidate": candidate}
        content = f'{q}\nIs the answer "{candidate}"?\n{RFP["YN"]}'
        return _with_user_turn(ex, content, target, _meta(ex, style, g, info)), None
    if style in ("BE", "DE"):
        if not explanation:
            return None, "generator failure: no explanation"
        sep = " " if g.rstrip().endswith((".", "!", "?")) else ". "
        target = g.rstrip() + sep + explanation
    else:
        target = g
    return _with_user_turn(ex, f"{q}\n{RFP[style]}", target, _meta(ex, style, g, {"target": target})), None


def _convert_checked(
    ex: Example, style: str, rng: random.Random, candidates: list[str], contrasts: Sequence[str], expl: str | None
) -> tuple[Example | None, str | None]:
    """One row in ``style``, or why not: an explanation that fails :func:`explanation_problem` is not used."""
    others = [c for c in contrasts if normalize_answer(c) != normalize_answer(ex.answer)]
    reason = explanation_problem(expl, ex.prompt_text, ex.answer, others) if expl else None
    return (None, reason) if reason else _convert(ex, style, rng, candidates, expl)


def asd(
    examples: Sequence[Example],
    *,
    percent: float = 20.0,
    seed: int = 0,
    original_style: str = "SA",
    generator: Generator | None = None,
    generator_id: str = "none",
    count_tokens: Callable[[str], int] | None = None,
    labels: Sequence[str] | None = None,
    max_gold_tokens: int = MAX_GOLD_TOKENS,
    only: Collection[int] | None = None,
) -> AsdResult:
    """Convert ``percent`` % of ``examples`` to other answer styles (methods.md §4.1).

    Args:
        generator: writes BE/DE explanations; ``None`` moves the BE/DE quota to YN/MCQ/SA.
        count_tokens: token counter for the gold-length limit (whitespace words if None).
        labels: the task's label set, if known; else the distinct answers of ``examples``.
        only: convert only these row indices (previews); the plan is the same as for all rows.

    Returns:
        the same number of rows in the same order, and the report (``report.to_json()`` is asd.json).
    """
    if original_style not in STYLES:
        raise ValueError(f"unknown answer style {original_style!r}; one of {STYLES}")
    count = count_tokens or (lambda s: len(s.split()))
    styles = target_styles(original_style, with_explanations=generator is not None)
    assignment = plan(len(examples), percent, seed, styles)
    if only is not None:
        keep = set(only)
        assignment = {i: s for i, s in assignment.items() if i in keep}
    candidates, lset = label_set(examples, labels, count, max_gold_tokens)
    explanations = explanations_for(examples, assignment, generator)
    contrasts = candidates if lset["kind"] != "pool" else []  # free-form answers: no contradiction check
    out = list(examples)
    skipped: list[Skipped] = []
    counts = Counter({s: 0 for s in styles})
    for i in sorted(assignment):
        ex, style = examples[i], assignment[i]
        if not ex.answer.strip():
            converted, reason = None, "empty gold answer"
        elif style in ("MCQ", "YN") and count(ex.answer) > max_gold_tokens:
            converted, reason = None, f"gold answer longer than {max_gold_tokens} tokens ({style} would be unreadable)"
        else:
            converted, reason = _convert_checked(ex, style, random.Random(f"asd:{seed}:{i}"), candidates, contrasts,
                                                 explanations.get(i))
        if converted is not None:
            out[i] = converted
            counts[style] += 1
        if reason:
            skipped.append(Skipped(ex.where, style, reason))
    report = AsdReport(
        seed=seed,
        percent=percent,
        original_style=original_style,
        rows=len(examples),
        generator=generator_id if generator is not None else "none",
        requested={s: sum(v == s for v in assignment.values()) for s in styles},
        counts=dict(counts),
        skipped=skipped,
        redistributed=None if generator is not None else {"from": ["BE", "DE"], "to": styles},
        label_set=lset,
    )
    return AsdResult(out, report)


# ----------------------------------------------------------------------------------- grading

_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def _info(row_meta: dict[str, Any]) -> dict[str, Any]:
    inner = row_meta.get("meta")
    if isinstance(inner, dict) and isinstance(inner.get("asd"), dict):
        return inner["asd"]
    return row_meta.get("asd") or {}


def grade(style: str, reply: str, row_meta: dict[str, Any]) -> bool:
    """Is ``reply`` a correct answer to a row of ``style``? (methods.md §4.1 grading rules)

    ``row_meta`` is the row's ``Example.meta`` (``gold``, and for converted rows the grading
    details ASD stored under ``meta.asd``); for an unconverted row ``{"gold": answer}`` suffices.
    """
    gold = str(row_meta.get("gold", ""))
    info = _info(row_meta)
    if style == "SA":
        return normalize_answer(reply) == normalize_answer(gold)
    if style == "MCQ":
        options = info.get("options") or []
        letters = string.ascii_uppercase[: len(options)] or string.ascii_uppercase
        found = next((m for m in _LETTER.findall(reply) if m in letters), None)
        if found is not None:
            return found == info.get("letter")
        return bool(gold) and normalize_answer(reply) == normalize_answer(gold)
    if style == "YN":
        words = normalize_answer(reply).split()
        expected = str(info.get("target", "")).lower()
        return bool(words) and words[0] in ("yes", "no") and words[0] == expected
    if style in ("BE", "DE"):
        text, g = reply.strip(), gold.strip().rstrip(".")
        if g and text.lower().startswith(g.lower()) and text[len(g) : len(g) + 1] in ("", ".", "\n", "!", "?"):
            return True
        head = re.split(r"[.\n]", text, maxsplit=1)[0]
        return normalize_answer(head) == normalize_answer(gold)
    raise ValueError(f"unknown answer style {style!r}; one of {STYLES}")


def to_jsonl_rows(examples: Sequence[Example]) -> list[str]:
    """Converted rows as loadable JSON Lines (chat rows with their metadata)."""
    return [json.dumps({"messages": ex.messages, **ex.meta}, ensure_ascii=False, sort_keys=True) for ex in examples]


# ------------------------------------------------------------------------------ run extension


def asd_extension(settings: AsdSettings) -> RunExtension:
    """The ``train_task`` extension: rewrite ``ctx.examples`` and add the ``asd.json`` sidecar."""

    def apply(ctx: RunContext) -> None:
        gen: Generator | None = None
        gen_id = "none"
        if settings.generator == "base":
            gen = base_model_generator(ctx.model, ctx.tokenizer, batch_size=settings.generator_batch_size)
            gen_id = f"base:{ctx.base.id}@{ctx.base.fingerprint[:12]}:greedy"
        seed = ctx.config.train.seed if settings.seed is None else settings.seed
        result = asd(
            ctx.examples,
            percent=settings.percent,
            seed=seed,
            original_style=settings.original_style,
            generator=gen,
            generator_id=gen_id,
            count_tokens=lambda s: len(ctx.tokenizer(s, add_special_tokens=False)["input_ids"]),
            labels=settings.labels,
        )
        ctx.examples = result.examples
        ctx.sidecars.json["asd"] = result.report.to_json()
        ctx.sidecars.metrics["asd_converted"] = sum(result.report.counts.values())
        logger.info("ASD: converted %s of %d rows", result.report.counts, len(result.examples))
        for s in result.report.skipped:
            logger.warning("ASD: %s not converted to %s: %s", s.where, s.style, s.reason)

    return apply
