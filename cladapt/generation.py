"""Batched greedy generation through the chat template (used by ``generate``, eval and ASD)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from cladapt.vision import conversation_images, processor_of, prompt_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    from cladapt.train.chat import render_prompt

    return render_prompt(tokenizer, messages)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, Any]]],
    *,
    max_new_tokens: int = 50,
    batch_size: int = 16,
    adapter_names: Sequence[str] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[str]:
    """Greedy answers to each conversation (a list of messages ending with a user turn).

    On a vision-language base a message's ``images`` (paths) are shown to the model.

    Args:
        adapter_names: optional PEFT adapter name per row (mixed-adapter batches).
        progress: called with the number of rows finished after every batch.
    """
    texts = [render(tokenizer, conv) for conv in conversations]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    out: list[str] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            if processor_of(tokenizer) is not None:  # a vision-language base: images through its processor
                from transformers import BatchEncoding

                images = [conversation_images(c) for c in conversations[start : start + batch_size]]
                enc = BatchEncoding(prompt_batch(tokenizer, chunk, images)).to(model.device)
            else:
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            kwargs: dict[str, Any] = {}
            if adapter_names is not None:
                kwargs["adapter_names"] = list(adapter_names[start : start + batch_size])
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos or None,
                **kwargs,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
            if progress:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = old_side
    return out
