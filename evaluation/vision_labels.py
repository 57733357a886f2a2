"""Constrained scoring on vision-language bases: ``log p(label | image + prompt)`` with the model's own positions.

The text path (``cladapt.evaluation.label_scores.label_logprobs``) packs every label behind one prompt
with a tree attention mask and explicit ``position_ids``, or reuses a KV cache. Neither fits
every VLM: Qwen2-VL computes 3-D rotary positions from the image grid inside its forward, and
pixel inputs cannot be split from their prompt. Here each row's prompt (its images processed
once) is repeated once per label with that label's answer tokens appended, and one forward pass
scores all of them; the model computes its positions itself. Exact, and ``len(labels)`` times
the prompt's compute, which is small for label sets of classification tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from cladapt.vision import cat_vision, conversation_images, open_image, process


@torch.no_grad()
def vision_label_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    conversations: Sequence[list[dict[str, Any]]],
    conts: Sequence[list[int]],
    *,
    progress: Callable[[int], Any] | None = None,
) -> list[list[float]]:
    """``[row][label]`` summed log-probabilities of each label's answer tokens ``conts[label]``."""
    processor = tokenizer.processor
    out: list[list[float]] = []
    for text, conv in zip(prompts, conversations, strict=True):
        got = process(processor, text, [open_image(p) for p in conversation_images(conv)])
        n = len(got.input_ids)
        width = n + max(len(c) for c in conts)
        ids = torch.full((len(conts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        batch: dict[str, Any] = {}
        for key, values in got.token_extras.items():
            batch[key] = torch.zeros_like(ids)
            batch[key][:, :n] = torch.tensor(values)
        for j, cont in enumerate(conts):
            ids[j, : n + len(cont)] = torch.tensor(got.input_ids + list(cont))
            mask[j, : n + len(cont)] = 1
        batch.update(input_ids=ids, attention_mask=mask)
        if got.vision:
            batch.update(cat_vision([got.vision] * len(conts), processor))
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
        lp = torch.log_softmax(logits.float(), dim=-1)
        row = []
        for j, cont in enumerate(conts):
            positions = torch.arange(n - 1, n - 1 + len(cont), device=lp.device)
            row.append(float(lp[j, positions, torch.tensor(cont, device=lp.device)].sum()))
        out.append(row)
        if progress:
            progress(1)
    return out
