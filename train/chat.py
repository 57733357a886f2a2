"""Render examples with the base model's chat template; loss on answer tokens only.

Each assistant turn's tokens get labels; everything else (system prompt, user turns, the
template's role headers) gets -100. The rendered text is split at the boundaries the template
itself produces (render the conversation up to a turn, then up to and including it) and each
segment is tokenized on its own, so a boundary can never be merged into a neighbouring token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cladapt.errors import DataError, Issue

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cladapt.train.data import Example

IGNORE_INDEX = -100

#: used only when a tokenizer has no chat template of its own (ChatML, as SmolLM2 uses)
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The text a model is given at inference: the conversation plus the assistant header."""
    ensure_chat_template(tokenizer)
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def _segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_answer) segments."""
    out: list[tuple[str, bool]] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = render_prompt(tokenizer, messages[:k])
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


def encode(tokenizer: PreTrainedTokenizerBase, ex: Example, *, max_length: int, overlong: str) -> Encoded:
    """Token ids and labels of one example.

    Raises:
        ValueError: the example cannot fit (answer alone too long, or ``overlong="reject"``).
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in _segments(tokenizer, ex.messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    truncated = False
    if len(ids) > max_length:
        if overlong == "reject":
            raise ValueError(f"{len(ids)} tokens > max_length {max_length} (overlong=reject)")
        first_answer = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        cut = len(ids) - max_length
        if cut > first_answer:
            raise ValueError(f"the answer alone is {len(ids) - first_answer} tokens, over max_length {max_length}")
        # drop the start of the prompt: the instruction's tail, the input and the answer survive
        ids, labels, truncated = ids[cut:], labels[cut:], True
    return Encoded(ids, labels, truncated)


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
