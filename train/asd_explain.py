"""ASD's explanations (BE/DE answer styles): asking a writer for them, and refusing unusable ones.

The default writer is the base model itself, greedy (methods.md §4.1), through the one generation
loop (:mod:`cladapt.text.generation`); any batched callable (:data:`Generator`) can replace it.
An explanation is flattened to one paragraph and cut at its last sentence end; one that names
another label but not the gold, copies the question, or loops is a generator failure **[cladapt]**.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cladapt.data.rows import Example

EXPLAIN_WORDS = {"BE": 20, "DE": 50}
EXPLAIN_MAX_NEW_TOKENS = {"BE": 40, "DE": 90}
EXPLAIN_PROMPT = "The correct answer to the question below is '{gold}'. In about {words} words, explain why.\n\n{question}"


@dataclass(frozen=True)
class ExplainRequest:
    """One explanation to write: why ``gold`` answers ``question``, in about ``words`` words."""

    question: str
    gold: str
    words: int
    max_new_tokens: int
    #: the row's pictures (VQA rows): a vision-language writer looks at them too
    images: tuple[str, ...] = ()


#: a batched explanation writer: one result per request, ``None`` (or "") when it has nothing
Generator = Callable[[Sequence[ExplainRequest]], "list[str | None]"]


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """methods.md §11.5: lowercase, drop ASCII punctuation, collapse whitespace (articles kept)."""
    return " ".join(text.lower().translate(_PUNCT).split())


def clean_explanation(text: str | None, words: int) -> str | None:
    """One paragraph, cut at the last sentence end if generation stopped mid-sentence."""
    if not text:
        return None
    flat = " ".join(text.split()).strip().strip('"').strip()
    if len(flat.split()) < 3:
        return None
    if not flat.endswith((".", "!", "?")):
        cut = max(flat.rfind(". "), flat.rfind("! "), flat.rfind("? "))
        if cut > 0 and len(flat[: cut + 1].split()) >= max(3, words // 4):
            flat = flat[: cut + 1]
        else:
            flat += "."
    return flat


def explanation_problem(text: str, question: str, gold: str, others: Sequence[str]) -> str | None:
    """Why a generated explanation is unusable, or None. Three cheap checks **[cladapt]**: it names
    another label but not the gold (a small generator often contradicts the answer it was given),
    it merely copies the question (its first 6-12 words appear verbatim in it), or it loops (a
    word 3-gram occurs 3 times)."""
    norm = normalize_answer(text)

    def names(answer: str) -> bool:
        a = normalize_answer(answer)
        return bool(a) and re.search(rf"(?<!\S){re.escape(a)}(?!\S)", norm) is not None

    if not names(gold):
        other = next((o for o in others if names(o)), None)
        if other is not None:
            return f"generator failure: the explanation names another answer ({other!r}) and not the gold"
    words = norm.split()
    if len(words) >= 6 and " ".join(words[:12]) in normalize_answer(question):
        return "generator failure: the explanation copies the question"
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and max(trigrams.values()) >= 3:
        return "generator failure: the explanation repeats itself"
    return None


def explanations_for(
    examples: Sequence[Example], assignment: dict[int, str], generator: Generator | None
) -> dict[int, str | None]:
    rows = sorted(i for i, s in assignment.items() if s in ("BE", "DE") and examples[i].answer.strip())
    if not rows or generator is None:
        return {}
    requests = [
        ExplainRequest(
            question=examples[i].prompt_text,
            gold=examples[i].answer,
            words=EXPLAIN_WORDS[assignment[i]],
            max_new_tokens=EXPLAIN_MAX_NEW_TOKENS[assignment[i]],
            images=tuple(examples[i].images),
        )
        for i in rows
    ]
    results = list(generator(requests))
    if len(results) != len(requests):
        raise RuntimeError(f"the ASD generator returned {len(results)} results for {len(requests)} requests")
    return {i: clean_explanation(r, req.words) for i, r, req in zip(rows, results, requests, strict=True)}


def base_model_generator(model: Any, tokenizer: Any, *, batch_size: int = 16) -> Generator:
    """Explanations from ``model`` itself, greedy (methods.md §4.1 default), batched by length."""
    from cladapt.text.generation import generate
    from cladapt.vision import processor_of

    def run(requests: Sequence[ExplainRequest]) -> list[str | None]:
        out: list[str | None] = [None] * len(requests)
        was_training = model.training
        model.eval()  # a model handed back by a finished training run may still be in train mode
        try:
            for budget in sorted({r.max_new_tokens for r in requests}):
                idx = [k for k, r in enumerate(requests) if r.max_new_tokens == budget]
                convs = [
                    [{"role": "user", "content": EXPLAIN_PROMPT.format(gold=r.gold, words=r.words, question=r.question),
                      **({"images": list(r.images)} if r.images and processor_of(tokenizer) else {})}]
                    for r in (requests[k] for k in idx)
                ]
                texts = generate(model, tokenizer, convs, max_new_tokens=budget, batch_size=batch_size)
                for k, text in zip(idx, texts, strict=True):
                    out[k] = text
        finally:
            model.train(was_training)
        return out

    return run
