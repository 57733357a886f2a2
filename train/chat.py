"""Encode training examples through the base model's chat template (:mod:`cladapt.text.template`); loss on answer tokens only.

Each assistant turn's tokens get labels; everything else (system prompt, user turns, the
template's role headers) gets -100. The rendered text is split at the boundaries the template
itself produces (render the conversation up to a turn, then up to and including it) and each
segment is tokenized on its own, so a boundary can never be merged into a neighbouring token.

Over-long rows (``train.overlong: truncate``) lose the *middle of their input*: the system prompt,
earlier turns, the instruction with its option list, the template's headers and the answer are
kept whole, because test prompts are never cut and a row without its instruction teaches the
wrong task. The cut span is the row's ``input`` field (instruction rows) inside the last user
message, or that whole message when the row has no separate input (chat rows, ASD-rewritten rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cladapt.errors import DataError, Issue
from cladapt.text.template import render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cladapt.data.rows import Example

IGNORE_INDEX = -100


def _segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_answer) segments."""
    out: list[tuple[str, bool]] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:k])
        full = str(tokenizer.apply_chat_template(messages[: k + 1], tokenize=False))
        if not head.startswith(done) or not full.startswith(head):
            raise ValueError("the chat template does not render conversations as growing prefixes")
        out.append((head[len(done) :], False))
        out.append((full[len(head) :], True))
        done = full
    return out


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    #: more row keys for the collator (vision-language bases: image segments, token-aligned extras)
    extra: dict[str, Any] = field(default_factory=dict)


def _pieces(tokenizer: PreTrainedTokenizerBase, segments: list[tuple[str, bool]]) -> list[tuple[list[int], bool]]:
    return [(tokenizer(text, add_special_tokens=False)["input_ids"], is_answer) for text, is_answer in segments]


def _join(pieces: list[tuple[list[int], bool]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for piece, is_answer in pieces:
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _split_input(ex: Example, segments: list[tuple[str, bool]]) -> list[tuple[str, bool, bool]]:
    """``segments`` as (text, is_answer, cuttable), the cuttable one being the last user message's input.

    Raises:
        ValueError: the input cannot be found verbatim in the rendered prompt (a template that
            rewrites message text), so there is no safe place to cut.
    """
    k = max(i for i, (_, is_answer) in enumerate(segments) if not is_answer)  # the final prompt segment
    head = segments[k][0]
    user = next(m["content"] for m in reversed(ex.messages[:-1]) if m["role"] == "user")
    candidates = [ex.input_text, ex.input_text.strip()] if ex.input_text and ex.input_text in user else []
    candidates += [user, user.strip()]
    for span in candidates:
        at = head.rfind(span) if span else -1
        if at >= 0:
            parts = [(head[:at], False, False), (span, False, True), (head[at + len(span) :], False, False)]
            return [(t, a, False) for t, a in segments[:k]] + parts + [(t, a, False) for t, a in segments[k + 1 :]]
    raise ValueError("the chat template rewrites the user message, so the input cannot be located to shorten the row")


def _cut_middle(tokenizer: PreTrainedTokenizerBase, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels with the middle of the input removed so that the row has ``max_length`` tokens."""
    split = _split_input(ex, _segments(tokenizer, ex.messages))
    pieces = [(tokenizer(t, add_special_tokens=False)["input_ids"] if t else [], a, c) for t, a, c in split]
    total = sum(len(p) for p, _, _ in pieces)
    cut = total - max_length
    span = next(p for p, _, c in pieces if c)
    if cut > len(span):
        raise ValueError(
            f"{total} tokens > max_length {max_length} even without its input "
            f"({total - len(span)} tokens of instruction, template and answer)"
        )
    if cut > 0:
        keep = len(span) - cut
        span[:] = span[: (keep + 1) // 2] + span[len(span) - keep // 2 :]
    return _join([(p, a) for p, a, _ in pieces])


def encode(tokenizer: PreTrainedTokenizerBase, ex: Example, *, max_length: int, overlong: str) -> Encoded:
    """Token ids and labels of one example; an over-long one loses the middle of its input (module doc).

    Raises:
        ValueError: the example cannot fit (instruction and answer alone too long, or ``overlong="reject"``).
    """
    from cladapt.vision import processor_of

    if ex.images or processor_of(tokenizer) is not None:  # a vision-language row or base
        from cladapt.train.vision_encode import encode_vision

        return encode_vision(tokenizer, ex, max_length=max_length, overlong=overlong)
    ids, labels = _join(_pieces(tokenizer, _segments(tokenizer, ex.messages)))
    if len(ids) <= max_length:
        return Encoded(ids, labels, False)
    if overlong == "reject":
        raise ValueError(f"{len(ids)} tokens > max_length {max_length} (overlong=reject)")
    ids, labels = _cut_middle(tokenizer, ex, max_length)
    return Encoded(ids, labels, True)


def encode_all(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], *, max_length: int, overlong: str
) -> tuple[list[Encoded], dict[str, Any]]:
    """Encode every example; all failures are reported together as a DataError."""
    issues: list[Issue] = []
    out: list[Encoded] = []
    for ex in examples:
        try:
            out.append(encode(tokenizer, ex, max_length=max_length, overlong=overlong))
        except ValueError as exc:
            issues.append(Issue(ex.where, str(exc)))
    if issues:
        raise DataError(issues, hint="raise train.max_length, or use --set train.overlong=truncate")
    lengths = [len(e.input_ids) for e in out]
    stats = {
        "rows": len(out),
        "truncated": sum(e.truncated for e in out),
        "tokens": sum(lengths),
        "max_tokens": max(lengths) if lengths else 0,
        "mean_tokens": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
    }
    return out, stats
