"""JARe: apply each row's weighted combination of task adapters, in one batch (methods.md §6).

PEFT's mixed batches (``adapter_names=[...]``) give each row *one* adapter and no weights. A
weighted plan ``DeltaW(x) = sum_t W_t(x) * DeltaW_t`` per row is obtained instead by activating the
union of the batch's adapters and turning every LoRA layer's scalar ``scaling[name]`` into a
``[B, 1, 1]`` tensor ``alpha/r * W[:, name]``: PEFT's LoRA forward computes
``result + lora_B(lora_A(x)) * scaling``, which broadcasts the row weights (a row that does not use
an adapter gets weight 0). Exact, batch-independent per row, and undone on exit. Rows whose plan is
a single adapter take PEFT's own mixed-batch path, which costs one adapter per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from cladapt.serve.routers.base import Route

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names


@contextlib.contextmanager
def row_weights(model: Any, names: Sequence[str], weights: torch.Tensor) -> Iterator[None]:
    """Inside: adapter ``names[i]`` acts on row ``b`` with weight ``weights[b, i]``.

    Args:
        model: a PeftModel carrying every name.
        weights: ``[B, len(names)]``; B must equal the batch size of every forward inside.
    """
    from peft.tuners.lora import LoraLayer

    tuner = model.base_model
    before = list(tuner.active_adapters)
    saved: list[tuple[Any, str, Any]] = []
    tuner.set_adapter(list(names))
    try:
        for layer in model.modules():
            if not isinstance(layer, LoraLayer):
                continue
            for i, name in enumerate(names):
                if name in layer.scaling:
                    device = layer.lora_A[name].weight.device
                    saved.append((layer, name, layer.scaling[name]))
                    layer.scaling[name] = layer.scaling[name] * weights[:, i].to(device).view(-1, 1, 1)
        yield
    finally:
        for layer, name, value in saved:
            layer.scaling[name] = value
        tuner.set_adapter(before if len(before) > 1 else before[0])
        for p in model.parameters():  # set_adapter marks active adapters trainable; serving never trains
            p.requires_grad_(False)


def plan_of(route: Route, peft_names: dict[str, str]) -> tuple[str, ...] | None:
    """The adapter names when the route is one adapter (PEFT's fast path), else None."""
    if route.combine == "base":
        return (BASE_ADAPTER,)
    if route.combine == "mix" and len(route.adapters) == 1:
        return (peft_names[route.adapters[0][0]],)
    return None


def weight_matrix(routes: Sequence[Route], peft_names: dict[str, str]) -> tuple[list[str], torch.Tensor]:
    """The union of the rows' adapters and the ``[B, n]`` weights (``sum`` routes: 1.0 each)."""
    names: list[str] = []
    for route in routes:
        for ref, _ in route.adapters:
            if peft_names[ref] not in names:
                names.append(peft_names[ref])
    w = torch.zeros(len(routes), len(names))
    for b, route in enumerate(routes):
        for ref, weight in route.adapters:
            w[b, names.index(peft_names[ref])] = weight
    return names, w


@contextlib.contextmanager
def applied(model: Any, routes: Sequence[Route], peft_names: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Set ``model`` up for a batch of ``routes``; yields extra forward/generate kwargs.

    Single-adapter routes yield ``adapter_names`` (PEFT's mixed batch); any weighted or summed
    route switches the whole batch to :func:`row_weights`.
    """
    singles = [plan_of(r, peft_names) for r in routes]
    if all(s == (BASE_ADAPTER,) for s in singles):  # no adapter at all (the model may not be a PeftModel)
        yield {}
        return
    if all(s is not None for s in singles):
        yield {"adapter_names": [s[0] for s in singles if s is not None]}
        return
    names, w = weight_matrix(routes, peft_names)
    with row_weights(model, names, w):
        yield {}
