"""QLoRA: a frozen base loaded in 4 or 8 bits through bitsandbytes, a plain LoRA trained on top.

``train.quantization: 4bit`` is QLoRA's recipe (Dettmers et al. 2023): NF4 weights with double
quantization, computation in ``train.dtype``, and PEFT's ``prepare_model_for_kbit_training`` (fp32
norms and embeddings, input gradients for checkpointing). ``8bit`` is LLM.int8. Only the base is
quantised: the LoRA factors stay in full precision and are saved as an ordinary PEFT adapter whose
config names the unquantised base, so the version loads, merges and serves on the fp32/bf16
weights like any other. The model fingerprint is that of the weight files, unchanged.

What a quantised base cannot do: hold earlier summed adapters folded into its weights (the packed
4-bit/int8 storage cannot take ``W + sum B A`` without re-quantising it, which would change the
earlier tasks' functions). A run that would fold is refused before training (:func:`check_fold`).

Where it runs: bitsandbytes >= 0.48 has CPU kernels for NF4 and int8 (checked with 0.50 on the tiny
model: loads, trains, loss falls); older releases need CUDA. :func:`check_backend` tries a real
quantisation on the device the run uses and names the version when it fails.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cladapt.errors import CladaptError

logger = logging.getLogger(__name__)

#: what the manifest records for each kind (plus the bitsandbytes version)
RECIPES: dict[str, dict[str, Any]] = {
    "4bit": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "8bit": {"bits": 8, "quant_type": "llm.int8"},
}


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise CladaptError(
            f"train.quantization needs the bitsandbytes package ({exc})",
            hint="pip install 'cladapt[bnb]'",
        ) from exc
    return bitsandbytes


def check_backend(kind: str, device: str | None = None) -> str:
    """Quantise a small matrix the way the run will; returns the bitsandbytes version.

    Raises:
        CladaptError: bitsandbytes is missing or cannot quantise on ``device`` (CUDA if present).
    """
    bnb = _bitsandbytes()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    probe = torch.randn(64, 64, device=device)
    try:
        if kind == "4bit":
            packed, state = bnb.functional.quantize_4bit(probe, quant_type="nf4")
            bnb.functional.dequantize_4bit(packed, state)
        else:
            bnb.functional.int8_vectorwise_quant(probe.half())
    except Exception as exc:  # bitsandbytes raises RuntimeError/NotImplementedError/ValueError by backend
        raise CladaptError(
            f"bitsandbytes {bnb.__version__} cannot quantise to {kind} on {device}: {type(exc).__name__}: {exc}",
            hint="use a CUDA machine, or bitsandbytes >= 0.48 for CPU support; or train.quantization=none",
        ) from exc
    return str(bnb.__version__)


def quantization_config(kind: str, dtype: str) -> Any:
    """The ``BitsAndBytesConfig`` of ``kind`` ("4bit", "8bit"), or None for "none"."""
    if kind == "none":
        return None
    if kind not in RECIPES:
        raise CladaptError(f"unknown quantization {kind!r}", hint="use none, 4bit or 8bit")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )


def record(kind: str, dtype: str, version: str) -> dict[str, Any]:
    """The manifest's description of a quantised base (``train_stats.quantization``)."""
    out = {**RECIPES[kind], "bitsandbytes": version}
    if kind == "4bit":
        out["compute_dtype"] = dtype
    return out


def is_quantized(model: Any) -> bool:
    """Whether ``model`` was loaded through bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare(model: Any, *, gradient_checkpointing: bool) -> Any:
    """PEFT's k-bit preparation: frozen base, fp32 norms/embeddings, input grads when checkpointing."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def check_fold(model: Any, folded_versions: int, method: str) -> None:
    """Refuse to fold earlier summed adapters into a quantised base (module doc)."""
    if folded_versions and is_quantized(model):
        raise CladaptError(
            f"method {method!r} adds {folded_versions} earlier version(s) into the base weights, "
            "which a 4/8-bit base cannot hold without re-quantising them",
            hint="train this method on the unquantised base (train.quantization=none), or use a routed method (lora)",
        )


def load_options(kind: str, dtype: str) -> Any:
    """What ``base_model.load(quantization=...)`` takes for ``train.quantization`` (None for none).

    The backend is probed first, so a machine that cannot run it fails before the model loads.
    """
    if kind == "none":
        return None
    check_backend(kind)
    return quantization_config(kind, dtype)


def prepare_run(model: Any, *, kind: str, dtype: str, gradient_checkpointing: bool, folded_versions: int,
                method: str) -> dict[str, Any] | None:
    """Ready a quantised base for LoRA training; returns what the manifest records (None: not quantised).

    Raises:
        CladaptError: the config asks for quantization but the model was handed in unquantised, or
            the method would fold earlier versions into the quantised weights.
    """
    if not is_quantized(model):
        if kind != "none":
            raise CladaptError(
                f"train.quantization={kind} but the base model was passed in already loaded without it",
                hint="let the run load the base model, or load it with the same BitsAndBytesConfig",
            )
        return None
    kind = "4bit" if getattr(model, "is_loaded_in_4bit", False) else "8bit"  # what the model holds
    check_fold(model, folded_versions, method)
    prepare(model, gradient_checkpointing=gradient_checkpointing)
    return record(kind, dtype, str(_bitsandbytes().__version__))
