"""Routing signatures: written with every committed version, or indexed later for older ones.

A signature (:class:`cladapt.features.Signature`) is router-agnostic: the embeddings of a seeded
sample (<= 256) of the task's prompts in the base space, the own-adapter space and the optional
sentence-encoder space, plus their answers. Routers derive their state from it at serving time, so
adding a router never means retraining and ``train/`` never imports ``serve/``.

* At training: :func:`signature_sidecars` returns ``sidecars/signature.{safetensors,json}`` for the
  version being committed (computed on the unmodified base with the trained adapter alone, exactly
  as a router embeds a query with one candidate's adapter).
* Afterwards: :func:`index_version` computes the same for a version committed without one and
  stores it as shared state ``signatures/<task>-v<N>`` (versions themselves are immutable).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.adapters.base import Sidecars
from cladapt.errors import CladaptError
from cladapt.features import SIGNATURE_KIND, SIGNATURE_STEM, Signature, build_signature, load_encoder, signature_key

if TYPE_CHECKING:
    from cladapt.base_model import BaseModelInfo
    from cladapt.data.rows import Example
    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)


def compute_signature(model: Any, tokenizer: Any, examples: list[Example], *, adapter: str, seed: int,
                      base_fingerprint: str) -> Signature:
    """Embed a seeded sample of ``examples``' prompts with ``adapter`` on ``model`` (a PeftModel).

    Image rows (on a vision-language base) are embedded with their images in the base and
    own-adapter spaces, so image requests are routed by what they show as well as what they ask;
    the sentence-encoder space embeds their text only.
    """
    from cladapt.image_prompts import ImagePrompt

    prompts: list[str] = [ImagePrompt.images_first(ex.prompt_text, ex.images) if ex.images else ex.prompt_text
                          for ex in examples]
    labels = [ex.answer for ex in examples]
    sig = build_signature(model, tokenizer, prompts, labels, adapter=adapter, encoder=load_encoder(), seed=seed,
                          base_fingerprint=base_fingerprint)
    if any(ex.images for ex in examples):  # said in the stored signature, for whoever reads it later
        sig.meta["images"] = "image rows: base and own spaces embed the images and the text; encoder: the text only"
    return sig


def signature_sidecars(model: Any, tokenizer: Any, examples: list[Example], *, adapter: str, seed: int,
                       base: BaseModelInfo) -> Sidecars:
    """The signature of the version being trained, as sidecars to commit with it."""
    sig = compute_signature(model, tokenizer, examples, adapter=adapter, seed=seed, base_fingerprint=base.fingerprint)
    logger.info("Routing signature: %d prompts (%s)", sig.base.shape[0],
                "base, own adapter, encoder" if sig.encoder is not None else "base, own adapter; no encoder")
    return Sidecars(tensors={SIGNATURE_STEM: sig.tensors()}, json={SIGNATURE_STEM: sig.to_json()})


def index_version(store: Store, ref: str, data_files: list[str], *, seed: int | None = None,
                  loaded: tuple[Any, Any, BaseModelInfo] | None = None, force: bool = False) -> Signature:
    """Compute and store the signature of a version committed without one (``cladapt route index``).

    Args:
        data_files: the task's training data (any format ``cladapt train`` reads).
        seed: the sampling seed (default: the version's training seed).
        loaded: an already-loaded base (model, tokenizer, info); left as it was given.
        force: replace a signature indexed earlier.

    Raises:
        CladaptError: the version already carries a signature of its own.
        IncompatibleBaseModel: ``loaded`` is not the base the version was trained on.
    """
    from safetensors.torch import save_file

    from cladapt.adapters.loading import attach
    from cladapt.base_model import check_compatible, load
    from cladapt.data.rows import load_examples
    from cladapt.registry.fsio import dumps_json

    rec = store.get(ref)
    explicit = f"{rec.task}@{rec.version}"
    if rec.manifest.file(f"sidecars/{SIGNATURE_STEM}.safetensors") is not None:
        raise CladaptError(f"{explicit} already has the signature written when it was trained",
                           hint="nothing to index; routers read it directly")
    key = signature_key(rec.task, rec.version)
    if not force and store.read_shared(SIGNATURE_KIND, key) is not None:
        raise CladaptError(f"{explicit} is already indexed", hint="pass --force to compute it again")
    examples = load_examples(data_files).examples
    model, tokenizer, info = loaded if loaded is not None else load(rec.manifest.base_model["id"])
    check_compatible(rec.manifest.base_model, info, what=f"adapter {explicit}")
    peft_model, names = attach(model, store, info, [explicit])
    try:
        sig = compute_signature(peft_model, tokenizer, examples, adapter=names[0],
                                seed=rec.manifest.seed if seed is None else seed, base_fingerprint=info.fingerprint)
    finally:
        peft_model.unload()  # leave the caller's base model without LoRA layers
    with tempfile.TemporaryDirectory() as tmp:
        tensors_path, json_path = Path(tmp) / f"{SIGNATURE_STEM}.safetensors", Path(tmp) / f"{SIGNATURE_STEM}.json"
        save_file(sig.tensors(), str(tensors_path), metadata={"format": "pt"})
        json_path.write_bytes(dumps_json({**sig.to_json(), "ref": explicit, "data": [str(Path(f).resolve()) for f in data_files]}))
        store.write_shared(SIGNATURE_KIND, key, {tensors_path.name: tensors_path, json_path.name: json_path})
    return sig
