"""Mixed precision: fp32 weights with matmuls autocast to bf16/fp16 (training and evaluation).

Why a setting of its own rather than ``train.dtype``: ``dtype`` stores the *weights* in low
precision (memory), while ``mixed_precision`` keeps fp32 weights and optimizer state and only runs
the matrix products in bf16/fp16 (speed). On CPUs with AMX or AVX512-BF16 (recent Xeons) bf16
autocast makes a 135M-model forward about 3x and a LoRA training step about 2x faster; on CPUs
without those units it is emulated and slower, which is why ``auto`` checks the hardware.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

import torch

from cladapt.errors import ConfigError, Issue

logger = logging.getLogger(__name__)

MixedPrecision = Literal["no", "bf16", "fp16", "auto"]


def cpu_has_fast_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve(mode: str, device: str | torch.device | None = None) -> Literal["no", "bf16", "fp16"]:
    """The concrete precision for ``device`` (``auto``: bf16 where the hardware has it, else no)."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if mode == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if kind == "cpu" and cpu_has_fast_bf16() else "no"
    if mode == "fp16" and kind == "cpu":
        raise ConfigError([Issue("train.mixed_precision", "fp16 autocast needs a CUDA device")],
                          hint="use bf16 (or auto) on CPU")
    if mode not in ("no", "bf16", "fp16"):
        raise ConfigError([Issue("train.mixed_precision", f"unknown value {mode!r}")], hint="use no, bf16, fp16 or auto")
    return mode  # type: ignore[return-value]


@contextlib.contextmanager
def autocast(mode: str, device: str | torch.device | None = None) -> Iterator[None]:
    """Run the enclosed forward passes under ``mode`` (already resolved or ``auto``)."""
    resolved = resolve(mode, device)
    if resolved == "no":
        yield
        return
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.autocast(device_type=kind, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16):
        yield
