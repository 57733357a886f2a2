"""Adapter tensors: parse PEFT state dicts, fold adapters into base weights, rank-concatenate.

A sum of LoRAs is exactly one LoRA of rank ``R = sum_t r_t`` (methods.md §10)::

    A_cat = cat_rows(A_1, ..., A_T)              # [R, d_in]
    B_cat = cat_cols(s_1 B_1, ..., s_T B_T)      # [d_out, R]   each adapter's scaling folded into B
    LoraConfig(r=R, lora_alpha=R)                # scaling 1

Folding each scaling into ``B`` avoids depending on PEFT's or O-LoRA's scaling conventions for
concatenated adapters. ``rank_pattern``/``alpha_pattern`` cover modules whose total rank differs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cladapt.errors import CapacityError

if TYPE_CHECKING:
    from torch import nn

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Factors:
    """One adapter's factors on one module, in fp32, with its scaling."""

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scaling: float

    def delta(self) -> torch.Tensor:
        """``s * B @ A`` in fp32: the weight update this adapter adds to the module."""
        return self.scaling * (self.B.float() @ self.A.float())


def module_key(state_key: str) -> tuple[str, str] | None:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> (module path, "A")."""
    m = _KEY.match(state_key)
    return (m.group("module"), m.group("which")) if m else None


def normalize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT file keys -> ``<module path>.lora_A.weight`` / ``.lora_B.weight`` (base-model paths)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parsed = module_key(key)
        if parsed is None:
            raise ValueError(f"unexpected tensor {key!r} in a LoRA adapter (only lora_A/lora_B are supported)")
        out[f"{parsed[0]}.lora_{parsed[1]}.weight"] = value
    return out


def factors(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Factors]:
    """Per-module factors of one adapter, given its (normalized or raw) state and adapter_config."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parsed = module_key(key)
        if parsed is None:
            raise ValueError(f"unexpected tensor {key!r} in a LoRA adapter")
        pairs.setdefault(parsed[0], {})[parsed[1]] = value
    out: dict[str, Factors] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"module {module} has only lora_{''.join(ab)}")
        r = ab["A"].shape[0]
        name = module.rsplit(".", 1)[-1]
        rank = config.get("rank_pattern", {}).get(name, config.get("r", r))
        alpha = config.get("alpha_pattern", {}).get(name, config.get("lora_alpha", rank))
        scaling = float(alpha) / float(rank)
        if config.get("use_rslora"):
            scaling = float(alpha) / float(rank) ** 0.5
        out[module] = Factors(ab["A"].float(), ab["B"].float(), scaling)
    return out


def rank_concat(adapters: Sequence[dict[str, Factors]]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Concatenate several adapters into one state dict of scaling 1.

    Returns:
        (state dict with PEFT file keys, per-module total rank).
    """
    by_module: dict[str, list[Factors]] = {}
    for adapter in adapters:
        for module, f in adapter.items():
            by_module.setdefault(module, []).append(f)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, fs in by_module.items():
        a = torch.cat([f.A for f in fs], dim=0)
        b = torch.cat([f.scaling * f.B for f in fs], dim=1)
        if a.shape[0] > a.shape[1]:
            raise CapacityError(
                f"module {module}: the summed rank {a.shape[0]} exceeds its input dimension {a.shape[1]}",
                hint="fewer or lower-rank adapters, or route instead of summing",
            )
        state[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        ranks[module] = a.shape[0]
    return state, ranks


def concat_config(ranks: dict[str, int], base_model_id: str) -> dict[str, Any]:
    """An adapter_config for :func:`rank_concat`'s output (scaling 1 everywhere)."""
    from peft import LoraConfig

    targets = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    top = max(ranks.values())
    rank_pattern = {m: r for m, r in ranks.items() if r != top}
    cfg = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_id,
    )
    return cfg.to_dict()


def _get_linear(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` in the base model, looking through a PEFT wrapper if present."""
    inner = model
    for attr in ("base_model", "model"):
        if hasattr(inner, "peft_config") and hasattr(inner, attr):
            inner = getattr(inner, attr)
    base = getattr(model, "get_base_model", None)
    root = base() if callable(base) else inner
    mod = root.get_submodule(path)
    return getattr(mod, "base_layer", mod)


@contextmanager
def folded(model: nn.Module, adapters: Sequence[dict[str, Factors]]) -> Iterator[None]:
    """Temporarily add ``sum_t s_t B_t A_t`` into the frozen base weights (exact, fp32 math).

    Training on top of folded weights costs the same at task 8 as at task 2, unlike keeping
    every earlier adapter in the forward pass. The original weights are restored bit-exactly
    on exit (kept as copies, not subtracted).
    """
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for adapter in adapters:
                for path, f in adapter.items():
                    layer = _get_linear(model, path)
                    if path not in saved:
                        saved[path] = layer.weight.detach().clone()
                    w = layer.weight
                    w.copy_((w.float() + f.delta().to(w.device)).to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for path, original in saved.items():
                _get_linear(model, path).weight.copy_(original)
