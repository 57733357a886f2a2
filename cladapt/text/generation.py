"""The one batched generation loop: ``cladapt generate``, evaluation, ASD rewrites, GeRe's self-generated texts
and the server's fallback path all decode through :func:`generate`.

Greedy by default (evaluation and ASD must be deterministic); ``sampling`` plus ``seed`` give reproducible
sampled text: torch is re-seeded with ``seed + batch index`` before every batch, so the output depends only on
the model, the prompts, the settings and ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from cladapt.text.template import render
from cladapt.vision import conversation_images, processor_of, prompt_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[int], Any]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], conversations: Sequence[list[dict[str, Any]]],
            device: Any) -> Any:
    """One left-padded batch; a vision-language base gets the conversations' images through its processor."""
    if processor_of(tokenizer) is not None:
        from transformers import BatchEncoding

        images = [conversation_images(c) for c in conversations]
        return BatchEncoding(prompt_batch(tokenizer, texts, images)).to(device)
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, Any]]],
    *,
    max_new_tokens: int = 50,
    batch_size: int = 16,
    adapter_names: Sequence[str] | None = None,
    progress: Progress | None = None,
    sampling: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> list[str]:
    """Answers to each conversation (a list of messages ending with a user turn), in order.

    On a vision-language base a message's ``images`` (paths) are shown to the model. The model is put
    in eval mode for the call and left in the mode it was given in.

    Args:
        adapter_names: optional PEFT adapter name per row (mixed-adapter batches).
        progress: called with the number of rows finished after every batch.
        sampling: ``model.generate`` sampling settings (``temperature``, ``top_p``, ...); None = greedy.
        seed: with ``sampling``, batch ``b`` is drawn after ``torch.manual_seed(seed + b)``.
    """
    texts = [render(tokenizer, conv) for conv in conversations]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    was_training = model.training
    model.eval()
    out: list[str] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    decode = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
    try:
        for b, start in enumerate(range(0, len(texts), batch_size)):
            enc = _encode(tokenizer, texts[start : start + batch_size], conversations[start : start + batch_size],
                          model.device)
            kwargs: dict[str, Any] = dict(decode)
            if adapter_names is not None:
                kwargs["adapter_names"] = list(adapter_names[start : start + batch_size])
            if sampling:
                torch.manual_seed(seed + b)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos or None, **kwargs)
            new = gen[:, enc["input_ids"].shape[1] :]
            out += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
            if progress:
                progress(len(new))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out
