"""Training rows for vision-language bases: tokens with expanded image placeholders, answer-only labels.

The conversation is rendered and split exactly as for text (``cladapt.train.chat``: the
template's own turn boundaries, answers labelled, everything else -100). Each non-answer segment
then goes through the model's processor with the images whose placeholders it holds, which
expands every placeholder into the model's image-token count (LLaVA: one per patch, Qwen2-VL and
SmolVLM: from the image size) and yields token-aligned extras such as Qwen2-VL's
``mm_token_type_ids``. Answer segments are plain text.

Rows keep image *paths*, not pixels: :class:`VisionCollator` opens and processes a batch's
images when the batch is built, so memory holds one batch of pictures at a time. An image row
longer than ``train.max_length`` is an error (image tokens cannot be cut; the text around them
could be, but a VQA question without its words teaches nothing); a text row on a VLM loses the
middle of its input as on a text base (``train.overlong``).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from cladapt.data.rows import Example
from cladapt.train.chat import IGNORE_INDEX, Encoded, _cut_middle, _segments
from cladapt.train.loop import SIDE_KEYS, Collator
from cladapt.vision import Processed, cat_vision, open_image, process, processor_of

#: the row key holding a row's image segments (JSON: [[rendered text, [image paths]], ...])
VISION_KEY = "vision"


def encode_vision(tokenizer: Any, ex: Example, *, max_length: int, overlong: str) -> Encoded:
    """Token ids, labels and vision extras of one example for a vision-language base.

    Raises:
        ValueError: the template's image placeholders do not match the row's images, or the row
            is longer than ``max_length``.
        DataError: an image cannot be read.
    """
    processor = processor_of(tokenizer)
    if processor is None:
        raise ValueError("the row has images but the base model is text-only (load a vision-language base)")
    token = processor.image_token
    queue = list(ex.images)
    ids: list[int] = []
    labels: list[int] = []
    extras: dict[str, list[int]] = {}
    segments: list[tuple[str, list[str]]] = []
    for text, is_answer in _segments(tokenizer, ex.messages):
        count = 0 if is_answer else text.count(token)
        paths, queue = queue[:count], queue[count:]
        if len(paths) < count:
            raise ValueError(f"the chat template rendered more image placeholders than the row's {len(ex.images)} images")
        if is_answer:
            got = Processed(tokenizer(text, add_special_tokens=False)["input_ids"], {}, {})
        else:
            got = process(processor, text, [open_image(p, where=ex.where) for p in paths])
        for key in set(extras) | set(got.token_extras):
            extras.setdefault(key, [0] * len(ids))
            extras[key] += got.token_extras.get(key, [0] * len(got.input_ids))
        ids += got.input_ids
        labels += got.input_ids if is_answer else [IGNORE_INDEX] * len(got.input_ids)
        if paths:
            segments.append((text, paths))
    if queue:
        raise ValueError(f"{len(queue)} of the row's images have no placeholder in the rendered prompt")
    truncated = False
    if len(ids) > max_length and not segments and overlong == "truncate":
        # a text row on a vision-language base: the middle of its input goes, as on a text base
        ids, labels = _cut_middle(tokenizer, ex, max_length)
        extras = {key: [0] * len(ids) for key in extras}
        truncated = True
    if len(ids) > max_length:
        why = "image rows are never cut" if segments else "overlong=reject"
        raise ValueError(f"{len(ids)} tokens (images included) > max_length {max_length}; {why}")
    extra: dict[str, Any] = {VISION_KEY: json.dumps(segments) if segments else "", **extras}
    return Encoded(ids, labels, truncated, extra=extra)


class VisionCollator(Collator):
    """:class:`Collator` plus the batch's pixel tensors and token-aligned extras (right padding)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer.pad_token_id)
        self.processor = processor_of(tokenizer)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = super().__call__(rows)
        width = out["input_ids"].shape[1]
        known = {"input_ids", "labels", VISION_KEY, *SIDE_KEYS}
        for key in dict.fromkeys(k for r in rows for k in r if k not in known):
            values = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                if r.get(key) is not None:  # replay rows carry no extras: text, 0
                    values[i, : len(r[key])] = torch.tensor(r[key])
            out[key] = values
        parts = []
        for r in rows:
            for text, paths in json.loads(r.get(VISION_KEY) or "[]"):
                parts.append(process(self.processor, text, [open_image(p) for p in paths]).vision)
        if parts:
            out.update(cat_vision(parts, self.processor))
        return out


def collator_for(tokenizer: Any) -> Collator:
    """The batch builder for ``tokenizer``'s model: :class:`VisionCollator` for vision-language bases."""
    return VisionCollator(tokenizer) if processor_of(tokenizer) is not None else Collator(tokenizer.pad_token_id)
