"""Vision-language bases: loading through the processor, LoRA scope, image rows as model inputs.

A base whose ``config.json`` has a ``vision_config`` loads through
``AutoModelForImageTextToText`` and ``AutoProcessor``. The rest of cladapt keeps talking to a
*tokenizer*: :class:`VisionTokenizer` is the processor's text tokenizer whose
``apply_chat_template`` renders through the processor's template, with each message's
``images`` turned into image parts (placed before the message's text, the layout LLaVA, Qwen2-VL
and SmolVLM are trained on). Rendered text holds one placeholder per image; :func:`process`
runs the processor on it, which expands each placeholder to the model's image-token count and
returns the pixel tensors.

Images are read only here, when a batch is built (:func:`open_image`), so a data set of many
pictures never sits in memory; rows are validated earlier by ``cladapt.data.image_rows``.

LoRA on a VLM adapts the language model only by default (``lora.target_scope``): a plain
``["q_proj", "v_proj"]`` would also match the vision tower's attention, which changes how every
image is seen and costs the tower's activations in memory. :func:`scope_targets` turns the
names into a regex on the language model's module path, found from the model itself.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import DataError, Issue, ModelError

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

logger = logging.getLogger(__name__)

#: families verified with tiny random models (tests/vision) and the language model's path in
#: transformers 5.x; any other image-text-to-text model loads too, its path found from the model
FAMILIES: dict[str, str] = {
    "llava": "model.language_model",
    "llava_next": "model.language_model",
    "llava_onevision": "model.language_model",
    "qwen2_vl": "model.language_model",
    "qwen2_5_vl": "model.language_model",
    "idefics3": "model.text_model",
    "smolvlm": "model.text_model",
}
#: processor outputs whose first dimension is the batch, with the images along dimension 1
#: (Idefics3/SmolVLM); every other pixel tensor lists images (or patches) along dimension 0
_BATCHED_IMAGE_KEYS = {"idefics3": ("pixel_values", "pixel_attention_mask"), "smolvlm": ("pixel_values", "pixel_attention_mask")}
#: image modes that convert to RGB without losing meaning; 16-bit and float images do not
RGB_CONVERTIBLE = ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr")


def is_vision_config(config: Any) -> bool:
    """A transformers config of a vision-language model (it carries a vision tower's config)."""
    return getattr(config, "vision_config", None) is not None


def family(model_or_config: Any) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", ""))


# ------------------------------------------------------------------------------------- tokenizer


class VisionTokenizer:
    """The text tokenizer of a vision-language base, rendering chats through its processor.

    Everything but the chat template is the wrapped tokenizer's (encode, decode, padding side,
    special tokens), so code written for text models runs unchanged on text rows.
    """

    def __init__(self, processor: Any) -> None:
        object.__setattr__(self, "processor", processor)
        object.__setattr__(self, "tokenizer", processor.tokenizer)

    def __getattr__(self, name: str) -> Any:
        if name in ("processor", "tokenizer"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "chat_template":
            self.processor.chat_template = value
        else:
            setattr(self.tokenizer, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def chat_template(self) -> str | None:
        return self.processor.chat_template or getattr(self.tokenizer, "chat_template", None)

    @property
    def image_token(self) -> str:
        return str(self.processor.image_token)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        if kwargs.get("tokenize", True):
            raise ValueError("render with tokenize=False, then tokenize with the processor (cladapt.vision.process)")
        return self.processor.apply_chat_template(to_parts(messages), **kwargs)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        return self.processor.save_pretrained(*args, **kwargs)


def processor_of(tokenizer: Any) -> Any | None:
    """The processor behind ``tokenizer``, or None for a text model's tokenizer."""
    return tokenizer.processor if isinstance(tokenizer, VisionTokenizer) else None


def to_parts(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """cladapt messages (text ``content`` + optional ``images``) as the processor's content parts.

    A message whose ``content`` is already a list of parts (``{"type": "image"}`` /
    ``{"type": "text", "text"}``, as the server builds from an OpenAI request) keeps its order:
    interleaved text and images are rendered where the user put them.
    """
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            out.append({"role": m["role"], "content": list(m["content"])})
            continue
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in m.get("images") or ()]
        if m["content"] or not parts:
            parts.append({"type": "text", "text": m["content"]})
        out.append({"role": m["role"], "content": parts})
    return out


def conversation_images(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Image paths of a conversation, in the order their placeholders are rendered."""
    return [p for m in messages for p in m.get("images") or ()]


# ---------------------------------------------------------------------------------------- loading


def _image_only_processor(folder: Path | str, cls: type) -> Any:
    """The processor without its video processor.

    Qwen2-VL, SmolVLM and LLaVA-OneVision processors require a video processor, which in
    transformers 5.x needs torchvision; cladapt feeds images only, so it builds the processor
    from its image processor, tokenizer and chat template.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    class ImageOnly(cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, name: str, arg: Any) -> Any:
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

        def apply_chat_template(self, conversation: Any, chat_template: Any = None, **kwargs: Any) -> Any:
            # SmolVLM's override reads video defaults (num_frames) even for image-only chats
            from transformers.processing_utils import ProcessorMixin

            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    ImageOnly.__name__ = cls.__name__
    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        path = Path(folder) / name
        if path.is_file():
            text = path.read_text()
            template = text if name.endswith(".jinja") else json.loads(text).get("chat_template")
            break
    settings: dict[str, Any] = {}
    config = Path(folder) / "processor_config.json"  # image_seq_len, num_image_tokens, feature strategy ...
    if config.is_file():
        settings = {k: v for k, v in json.loads(config.read_text()).items() if k != "processor_class"}
    return ImageOnly(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        video_processor=None,
        chat_template=template,
        **settings,
    )


def load_processor(folder: Path | str) -> Any:
    """The model's processor; without torchvision, an image-only one where the video processor needs it."""
    import transformers
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        return AutoProcessor.from_pretrained(folder)
    except ImportError as exc:
        text = str(exc).lower()
        model_type = AutoConfig.from_pretrained(folder).model_type
        cls = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
        if "torchvision" not in text or "video" not in text or cls is None:
            raise
        logger.info("%s: video processor unavailable (no torchvision); loading the image-only processor", model_type)
        return _image_only_processor(folder, cls)


def load_model(folder: Path | str, dtype: torch.dtype) -> tuple[Any, VisionTokenizer]:
    """(model, tokenizer) of a vision-language base, through the image-text-to-text auto classes."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(folder)
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    except ValueError as exc:
        raise ModelError(f"{folder}: not an image-text-to-text model transformers can load: {exc}") from exc
    if getattr(processor, "image_token", None) is None:
        raise ModelError(f"{folder}: the processor defines no image token", hint="a processor with image_token is needed")
    if family(model) not in FAMILIES:
        logger.warning("vision family %r is not among the verified ones (%s)", family(model), ", ".join(FAMILIES))
    return model, VisionTokenizer(processor)


# ------------------------------------------------------------------------------------ LoRA scope


def language_model_path(model: Any) -> str:
    """Module path of the language model inside a (possibly PEFT-wrapped) VLM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is not None and decoder is not base:
        for name, module in base.named_modules():
            if module is decoder:
                return name
    known = FAMILIES.get(family(base))
    if known is None:
        raise ModelError(f"cannot find the language model inside {type(base).__name__}", hint="set lora.target_scope=all")
    return known


def scope_targets(lora_config: LoraConfig, model: Any, scope: str) -> LoraConfig:
    """Restrict a LoRA config's module names to the language model of a VLM (``scope="language_model"``).

    Text models and ``scope="all"`` are returned unchanged. The regex is what the exported
    ``adapter_config.json`` holds, so plain PEFT adapts exactly the same modules.
    """
    if scope == "all" or not is_vision_config(getattr(model, "config", None)):
        return lora_config
    targets = lora_config.target_modules
    if isinstance(targets, str):
        return lora_config  # already a regex
    names = "|".join(re.escape(t) for t in sorted(targets))
    lora_config.target_modules = rf"^{re.escape(language_model_path(model))}\..*\.({names})$"
    return lora_config


# --------------------------------------------------------------------------------------- images


def open_image(path: str | Path, *, where: str = "") -> Any:
    """An RGB ``PIL.Image`` (decoded now); bad files raise a DataError naming ``where`` and the file."""
    from PIL import Image, UnidentifiedImageError

    at = where or str(path)
    try:
        with Image.open(path) as img:
            if img.mode not in RGB_CONVERTIBLE:
                raise DataError([Issue(at, f"image {path}: mode {img.mode} cannot be shown as RGB")],
                                hint="save it as 8-bit RGB or greyscale (PNG/JPEG)")
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError([Issue(at, f"image {path} not found")]) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError([Issue(at, f"image {path} is not a readable image: {exc}")]) from exc


@dataclass
class Processed:
    """One rendered text run through the processor: tokens (image placeholders expanded) and pixels."""

    input_ids: list[int]
    #: processor outputs aligned with the tokens (Qwen2-VL's ``mm_token_type_ids``), 0 elsewhere
    token_extras: dict[str, list[int]]
    #: pixel tensors and image metadata (``pixel_values``, ``image_grid_thw``, ``image_sizes`` ...)
    vision: dict[str, torch.Tensor]


def process(processor: Any, text: str, images: Sequence[Any]) -> Processed:
    """Run ``processor`` on one text with the images whose placeholders it holds."""
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
    if images:
        kwargs["images"] = [list(images)] if family_of_processor(processor) in _BATCHED_IMAGE_KEYS else list(images)
    enc = processor(**kwargs)
    ids = enc["input_ids"][0].tolist()
    extras: dict[str, list[int]] = {}
    vision: dict[str, torch.Tensor] = {}
    for key, value in enc.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if value.dim() == 2 and value.shape == enc["input_ids"].shape and not key.startswith("pixel"):
            extras[key] = value[0].tolist()
        elif images:
            vision[key] = value
    return Processed(ids, extras, vision)


def family_of_processor(processor: Any) -> str:
    name = type(processor).__name__.lower()
    if name.startswith("idefics3"):
        return "idefics3"
    if name.startswith("smolvlm"):
        return "smolvlm"
    return name.removesuffix("processor")


def _pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    import torch.nn.functional as F

    pad: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape), strict=True):
        pad += [0, want - have]
    return F.pad(t, pad) if any(pad) else t


def cat_vision(parts: Sequence[dict[str, torch.Tensor]], processor: Any) -> dict[str, torch.Tensor]:
    """Join several rows' pixel tensors into one batch's (images in row order, padded to a common size)."""
    import torch

    batched = _BATCHED_IMAGE_KEYS.get(family_of_processor(processor), ())
    keys = [k for k in dict.fromkeys(k for p in parts for k in p)]
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [p[key] for p in parts if key in p]
        dim = 1 if key in batched else 0
        shape = [max(t.shape[i] for t in tensors) for i in range(tensors[0].dim())]
        padded = [_pad_to(t, [t.shape[i] if i == dim else shape[i] for i in range(t.dim())]) for t in tensors]
        out[key] = torch.cat(padded, dim=dim)
    return out


def prompt_batch(tokenizer: VisionTokenizer, texts: Sequence[str], images: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
    """Model inputs of rendered prompts with their images, left-padded (generation continues on the right)."""
    import torch

    processor = tokenizer.processor
    rows = [process(processor, t, [open_image(p) for p in paths]) for t, paths in zip(texts, images, strict=True)]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for r in rows for k in r.token_extras):
        out[key] = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, width - n :] = torch.tensor(r.input_ids)
        mask[i, width - n :] = 1
        for key, values in r.token_extras.items():
            out[key][i, width - n :] = torch.tensor(values)
    out.update(input_ids=ids, attention_mask=mask)
    parts = [r.vision for r in rows if r.vision]
    if parts:
        out.update(cat_vision(parts, processor))
    return out


def forward_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The keys of a training batch the model's forward takes (tokens, mask, pixels), on ``device``.

    Methods that run their own forward passes over task batches (InfLoRA's input statistics,
    GS-LoRA's forget loss) use it so that image rows are seen with their images.
    """
    skip = ("labels", "sample_kind", "row_index")
    return {k: v.to(device) for k, v in batch.items() if k not in skip and hasattr(v, "to")}
