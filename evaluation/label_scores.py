"""Constrained scoring: the log-likelihood of every label's answer segment given a row's prompt.

``argmax_l log p(answer_l | prompt)`` is the format-independent view of a classification task
(:func:`cladapt.evaluation.scoring.evaluate`, mode ``constrained``): the answer segment is exactly what
the trainer learns (label + the chat template's end of turn), summed over its tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from cladapt.text.template import render
from cladapt.vision import processor_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[int], Any]


@torch.no_grad()
def label_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    labels: Sequence[str],
    *,
    batch_size: int = 16,
    progress: Progress | None = None,
    packed: bool | None = None,
) -> list[list[float]]:
    """``[row][label]`` summed log-probability of each label's answer segment given the row's prompt.

    Two exact strategies (same numbers up to float rounding):

    * **packed** (default where the attention takes a custom 4D mask: ``sdpa`` and ``eager``): one
      forward pass per batch over the prompt followed by every label's tokens, with a tree-shaped
      mask (each label sees the prompt and its own earlier tokens only). A batch costs about one
      prompt pass, whatever the number of labels.
    * **cached**: one prompt pass fills the KV cache, then each label's few tokens are scored for the
      whole batch and the cache is cropped back (``1 + len(labels)`` passes per batch); used for
      attention kernels that take no custom mask (flash attention) and models without
      ``logits_to_keep``.

    Vision-language bases score each row's labels in one unpacked pass (``cladapt.evaluation.vision_labels``).
    """
    conts = [_answer_ids(tokenizer, conversations[0], label) for label in labels] if conversations else []
    if processor_of(tokenizer) is not None:  # a vision-language base: images and the model's own positions
        from cladapt.evaluation.vision_labels import vision_label_logprobs

        prompts = [render(tokenizer, c) for c in conversations]
        return vision_label_logprobs(model, tokenizer, prompts, conversations, conts, progress=progress)
    if packed is None:
        packed = _attn_implementation(model) in ("sdpa", "eager") and _takes(model, "logits_to_keep")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[list[float]] = []
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = [render(tokenizer, c) for c in conversations[start : start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            scorer = _packed_scores if packed else _cached_scores
            out += scorer(model, enc["input_ids"], enc["attention_mask"], conts).tolist()
            if progress:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = old_side
    return out


def _attn_implementation(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def _packed_scores(model: Any, ids: torch.Tensor, mask: torch.Tensor, conts: list[list[int]]) -> torch.Tensor:
    """Score every label of a left-padded batch in one forward pass with a tree attention mask."""
    device, (rows, width) = ids.device, ids.shape
    fed = [c[:-1] for c in conts]  # a label's last token is only predicted, never fed
    seg = torch.tensor([j for j, f in enumerate(fed) for _ in f], dtype=torch.long, device=device)
    off = torch.tensor([k for f in fed for k in range(len(f))], dtype=torch.long, device=device)
    extra = len(seg)
    tokens = torch.tensor([t for f in fed for t in f], dtype=ids.dtype, device=device)
    input_ids = torch.cat([ids, tokens.expand(rows, extra)], dim=1)
    lengths = mask.sum(-1)
    positions = torch.cat([(mask.cumsum(-1) - 1).clamp(min=0), lengths[:, None] + off[None, :]], dim=1)
    keys = mask.bool()
    total = width + extra
    allowed = torch.zeros(rows, total, total, dtype=torch.bool, device=device)
    allowed[:, :width, :width] = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None] & keys[:, None, :]
    allowed[:, width:, :width] = keys[:, None, :]
    allowed[:, width:, width:] = ((seg[:, None] == seg[None, :]) & (off[None, :] <= off[:, None]))[None]
    diag = torch.arange(total, device=device)
    allowed[:, diag, diag] = True  # padding queries see themselves: no all-masked row, no NaN
    if _attn_implementation(model) == "eager":  # eager adds the mask to the scores
        attn: torch.Tensor = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
        attn.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    else:
        attn = allowed
    logits = model(input_ids=input_ids, attention_mask=attn[:, None], position_ids=positions,
                   logits_to_keep=extra + 1).logits
    lp = torch.log_softmax(logits[:, -(extra + 1) :].float(), dim=-1)  # [rows, 1 + extra, vocab]
    scores = torch.zeros(rows, len(conts))
    cursor = 0
    for j, ids_j in enumerate(conts):
        total_j = lp[:, 0, ids_j[0]].clone()
        for k, target in enumerate(ids_j[1:]):
            total_j += lp[:, 1 + cursor + k, target]
        cursor += len(ids_j) - 1
        scores[:, j] = total_j.cpu()
    return scores


def _cached_scores(model: Any, ids: torch.Tensor, mask: torch.Tensor, conts: list[list[int]]) -> torch.Tensor:
    """Score every label of a left-padded batch from one KV-cached prompt pass plus a short pass per label."""
    from transformers import DynamicCache

    device, cache_kw = ids.device, _cache_kwarg(model)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    first = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache})
    first_lp = torch.log_softmax(first.logits[:, -1, :].float(), dim=-1)
    lengths, rows = mask.sum(-1), mask.shape[0]
    scores = torch.zeros(rows, len(conts))
    for j, ids_j in enumerate(conts):
        total = first_lp[:, ids_j[0]].clone()
        if len(ids_j) > 1:
            tok = torch.tensor(ids_j[:-1], device=device).expand(rows, -1)
            steps = torch.arange(len(ids_j) - 1, device=device)
            res = model(
                input_ids=tok,
                attention_mask=torch.cat([mask, torch.ones_like(tok)], dim=1),
                position_ids=lengths[:, None] + steps[None, :],
                use_cache=True,
                **{cache_kw: cache},
            )
            lp = torch.log_softmax(res.logits.float(), dim=-1)
            target = torch.tensor(ids_j[1:], device=device).expand(rows, -1)
            total += lp.gather(-1, target[..., None]).squeeze(-1).sum(-1)
            cache.crop(-(len(ids_j) - 1))  # drop the label tokens again: back to the prompt
        scores[:, j] = total.cpu()
    return scores


def _takes(model: Any, argument: str) -> bool:
    """Whether the (base) model's ``forward`` has ``argument``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def _cache_kwarg(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; use what the model takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _answer_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, str]], label: str) -> list[int]:
    """Token ids of the assistant segment the trainer learns for ``label`` (label + end of turn)."""
    head = render(tokenizer, conversation)
    full = str(tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": label}], tokenize=False))
    segment = full[len(head) :] if full.startswith(head) else label
    return list(tokenizer(segment, add_special_tokens=False)["input_ids"])
