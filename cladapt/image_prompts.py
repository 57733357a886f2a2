"""Prompts with pictures outside training: inline images of requests, and embedding image prompts for routing.

A request carries its pictures inline (OpenAI's ``image_url`` parts with ``data:`` URLs; a server
that fetched URLs would fetch whatever a client names), decoded by :func:`decode_data_url`.
Routing code passes prompts around as strings; :class:`ImagePrompt` is a string that also carries
the prompt's images in their order, and :func:`embed_image_prompts` embeds one in the model's own
space with its pictures (called by ``cladapt.features.hidden_embed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import DataError, Issue, ModelError
from cladapt.vision import open_image, process, processor_of

if TYPE_CHECKING:
    import torch


def decode_data_url(url: str, *, where: str) -> Any:
    """An RGB ``PIL.Image`` from a ``data:image/...;base64,...`` URL (the only images a request may carry).

    Raises:
        DataError: naming ``where``: a remote (http/https) URL, which is never fetched; another
            scheme; bad base64; bytes that are not an image; a mode that cannot be shown as RGB.
    """
    import base64
    import binascii
    import io

    if url.startswith(("http://", "https://")):
        raise DataError([Issue(where, "remote images are not fetched; send the image inline as a data URL "
                                      "(data:image/png;base64,...)")])
    head, sep, payload = url.partition(",")
    if not url.startswith("data:image/") or not sep or not head.endswith(";base64"):
        raise DataError([Issue(where, f"expected a data:image/<type>;base64,<data> URL, got {url[:40]!r}")])
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError([Issue(where, f"the data URL's base64 does not decode: {exc}")]) from exc
    return open_image(io.BytesIO(raw), where=where)


class ImagePrompt(str):
    """A prompt's text (the ``str`` itself) plus its images, in the order the user gave them.

    Routing code passes prompts around as strings; an ``ImagePrompt`` still is one (so a
    sentence encoder embeds its text only), and :func:`embed_image_prompts` shows the model its
    images too. ``parts`` is the order: ``("image", i)`` or ``("text", str)``.
    """

    images: list[Any]
    parts: list[tuple[str, Any]]

    def __new__(cls, parts: Sequence[tuple[str, Any]], images: Sequence[Any]) -> ImagePrompt:
        text = " ".join(str(v) for k, v in parts if k == "text" and str(v))
        self = super().__new__(cls, text)
        self.images = list(images)
        self.parts = list(parts)
        return self

    @classmethod
    def images_first(cls, text: str, images: Sequence[Any]) -> ImagePrompt:
        """The layout of training rows (:func:`to_parts`): every image, then the text."""
        return cls([*(("image", i) for i in range(len(images))), ("text", text)], images)

    def model_text(self, image_token: str) -> str:
        """The text the processor expands: one placeholder per image where it stands, no chat template."""
        return "".join(image_token if k == "image" else str(v) for k, v in self.parts)


def has_images(texts: Sequence[str]) -> bool:
    return any(isinstance(t, ImagePrompt) and t.images for t in texts)


def embed_image_prompts(model: Any, tokenizer: Any, prompts: Sequence[ImagePrompt]) -> torch.Tensor:
    """Mean-pooled last hidden state of the language model over image and text tokens, one row at a time.

    The multimodal body (vision tower, projector, language model; no LM head) sees each prompt's
    images through the processor, so two prompts whose pictures differ land apart even when their
    words are equal. Rows go one by one: no padding, and each family computes its own positions
    (Qwen2-VL's 3-D rotary ones from the image grid).
    """
    import torch

    from cladapt.features import mean_pool

    processor = processor_of(tokenizer)
    if processor is None:
        raise ModelError("image prompts need a vision-language base; this base model is text-only")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None)
    if body is None:
        raise ModelError(f"cannot find the multimodal body of {type(inner).__name__}")
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for prompt in prompts:
                images = [open_image(i) if isinstance(i, (str, Path)) else i for i in prompt.images]
                got = process(processor, prompt.model_text(processor.image_token), images)
                ids = torch.tensor([got.input_ids], device=device)
                mask = torch.ones_like(ids)
                extras = {k: torch.tensor([v], device=device) for k, v in got.token_extras.items()}
                vision = {k: v.to(device) for k, v in got.vision.items()}
                hidden = body(input_ids=ids, attention_mask=mask, use_cache=False, **extras, **vision).last_hidden_state
                out.append(mean_pool(hidden, mask).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, int(getattr(inner.config, "hidden_size", 0) or 0))
