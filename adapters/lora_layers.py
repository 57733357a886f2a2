"""Access to the LoRA layers of a PEFT model, by base-model module path, and their inputs.

Methods address modules by their path in the *base* model (``model.layers.0.self_attn.q_proj``),
the same keys :meth:`History.adapter_state` uses, so tensors from earlier versions line up with
the layers of the model being trained. Also: the capacity check shared by sum-composed methods,
and the streamed input covariances of InfLoRA/FOT (methods.md §9), grouped by shared input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cladapt.adapters.base import TRAIN_ADAPTER, History, HistoryEntry
from cladapt.errors import CapacityError
from cladapt.vision import forward_inputs

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."


def lora_layers(model: nn.Module, adapter: str = TRAIN_ADAPTER) -> dict[str, Any]:
    """Base-model module path -> PEFT ``LoraLayer`` that holds ``adapter``, in model order."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, Any] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            out[name.removeprefix(_PEFT_PREFIX)] = mod
    return out


def factor_params(layer: Any, adapter: str = TRAIN_ADAPTER) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """``(lora_A.weight [r, d_in], lora_B.weight [d_out, r])`` of one LoRA layer."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def in_out(layer: Any) -> tuple[int, int]:
    """``(d_in, d_out)`` of the wrapped linear layer."""
    return int(layer.in_features), int(layer.out_features)


def previous_factors(history: History, entries: Iterable[HistoryEntry]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per module path, the ``{"A", "B"}`` tensors of each entry (oldest first), fp32."""
    out: dict[str, list[dict[str, torch.Tensor]]] = {}
    for e in entries:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in history.adapter_state(e.ref).items():
            module, _, rest = key.rpartition(".lora_")
            pairs.setdefault(module, {})[rest.split(".")[0]] = value.float()
        for module, ab in pairs.items():
            out.setdefault(module, []).append(ab)
    return out


def check_sum_capacity(model: nn.Module, history: History, entries: list[HistoryEntry], what: str) -> None:
    """Refuse, before training, a summed rank that the rank-concatenated export cannot hold.

    methods.md §10: a sum of LoRAs is one LoRA of rank ``R = sum r_t``; ``R > d_in`` cannot be
    exported (and orthogonality-based methods run out of room even earlier).
    """
    prev = previous_factors(history, entries)
    problems = []
    for path, layer in lora_layers(model).items():
        d_in, _ = in_out(layer)
        r = factor_params(layer)[0].shape[0]
        total = r + sum(ab["A"].shape[0] for ab in prev.get(path, []))
        if total > d_in:
            problems.append(f"{path}: summed rank {total} > d_in {d_in}")
    if problems:
        raise CapacityError(
            f"{what}: no room for another rank-{r} adapter: "
            + "; ".join(problems[:5])
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""),
            hint="lower lora.r, reject or remove old versions, or use a routed method (lora)",
        )


# ---------------------------------------------------------------------------------------------
# module inputs (InfLoRA / FOT)


def group_key(paths: list[str]) -> str:
    """A readable key for modules that share one input: ``model.layers.0.self_attn.q_proj+v_proj``."""
    parents = {p.rpartition(".")[0] for p in paths}
    if len(parents) == 1:
        parent = parents.pop()
        return f"{parent}." + "+".join(sorted(p.rpartition(".")[2] for p in paths))
    return "+".join(sorted(paths))


@dataclass
class InputStats:
    """Uncentered covariances ``X X^T / N`` of module inputs over non-pad tokens."""

    cov: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> [d_in, d_in] fp32
    module_key: dict[str, str] = field(default_factory=dict)  # module path -> key
    tokens: int = 0


@contextmanager
def _input_hooks(layers: dict[str, Any], sink: Any) -> Iterator[None]:
    handles = []
    for path, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(lambda _m, args, _p=path: sink(_p, args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_covariances(model: nn.Module, layers: dict[str, Any], loader: Iterable[dict[str, Any]]) -> InputStats:
    """Stream the inputs each LoRA layer sees over ``loader`` into per-input covariances.

    Modules called one after the other on the *same tensor object* (``q_proj``/``k_proj``/
    ``v_proj`` of a Llama layer, ``gate_proj``/``up_proj``) share one key and one covariance.
    Padding is masked (it would add a fake direction, methods.md §9). The model runs in eval mode
    (no dropout) with whatever adapters are folded/active: the inputs the module actually sees.
    """
    stats = InputStats()
    sums: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mask": None, "last": None, "group": []}
    groups: list[list[str]] = []

    def sink(path: str, x: torch.Tensor) -> None:
        if state["last"] is not x:
            state["group"] = [path]
            groups.append(state["group"])
            state["last"] = x
            flat = x.detach().float().reshape(-1, x.shape[-1])[state["mask"]]
            sums[path] = sums.get(path, 0) + flat.T @ flat  # type: ignore[operator]
        else:
            state["group"].append(path)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with _input_hooks(layers, sink):
            for batch in loader:
                mask = batch["attention_mask"].to(device).reshape(-1).bool()
                state["mask"], state["last"] = mask, None
                groups.clear()
                model(**forward_inputs(batch, device))  # image rows with their pixels
                stats.tokens += int(mask.sum())
    finally:
        state["last"] = None
        model.train(was_training)
    if stats.tokens == 0:
        raise CapacityError("no tokens to estimate input subspaces from", hint="check the task data is not empty")
    for members in groups:  # the last batch's grouping (identical for every batch)
        key = group_key(members)
        for p in members:
            stats.module_key[p] = key
        stats.cov[key] = sums[members[0]].cpu() / stats.tokens
    return stats
