"""General perplexity: how much a model still models plain text (the gate's ``max_ppl_rise``, GeRe's target).

Token-level perplexity of general-domain texts without the chat template, each cut to its first
``max_length`` tokens; the texts come from :func:`cladapt.text.texts.load_texts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cladapt.precision import autocast
from cladapt.text.texts import load_texts

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def general_texts(files: Sequence[str | Path], samples: int) -> list[str]:
    """The first ``samples`` texts of ``files``, in order (the set perplexity is measured on)."""
    return [t["text"] for f in files for t in load_texts(f, limit=samples)][:samples]


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8,
    precision: str = "no",
) -> float:
    """Token-level perplexity of plain texts (no chat template), each cut to its first ``max_length`` tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                max_length=max_length, add_special_tokens=False,
            ).to(model.device)
            with autocast(precision, model.device):
                logits = model(**enc).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:]
            keep = enc["attention_mask"][:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            total += float(nll[keep].sum())
            count += int(keep.sum())
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return float(torch.exp(torch.tensor(total / max(1, count))))
