"""Every loaded LoRA stacked per layer and applied per row with two batched matmuls (the BGMV idea of Punica/S-LoRA).

The engine (:mod:`cladapt.serve.engine`) uses it for text batches when every loaded adapter is a
plain LoRA on ``Linear`` layers: a batch then costs the same whatever number of distinct adapters
its rows mix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class StackedLora:
    """Every loaded adapter's factors stacked per LoRA layer, applied per row with two ``bmm``.

    Slot 0 is "no adapter" (zeros); slot ``i`` is ``names[i-1]``. Per layer: ``A [S, r, d_in]``,
    ``B [S, d_out, r]`` with each adapter's scaling folded into B and ranks zero-padded to the
    layer's largest (zero rows and columns add nothing, so the delta is exact). Inside
    :meth:`active`, PEFT's own LoRA path is disabled and a forward hook adds
    ``bmm(bmm(x, A[idx]ᵀ), B[idx]ᵀ)`` for the rows' slots ``idx``.
    """

    def __init__(self, names: tuple[str, ...], layers: dict[Any, tuple[torch.Tensor, torch.Tensor]], ok: bool) -> None:
        self.names = names
        self.layers = layers
        self.ok = ok
        self._slot = {name: i + 1 for i, name in enumerate(names)}
        self._rows: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._idx: torch.Tensor | None = None
        self._key: tuple[str, ...] = ()

    @classmethod
    @torch.no_grad()
    def build(cls, model: Any, names: Sequence[str]) -> StackedLora:
        from peft.tuners.lora import layer as lora_layer

        layers: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in model.modules():
            if not isinstance(module, lora_layer.LoraLayer) or not any(n in module.lora_A for n in names):
                continue
            plain = isinstance(module, lora_layer.Linear) and not getattr(module, "fan_in_fan_out", False)
            for n in names:
                if n in module.lora_A and (not plain or n in module.lora_variant or module.lora_B[n].bias is not None
                                           or module.use_dora.get(n, False)):
                    plain = False
            if not plain:
                return cls(tuple(names), {}, ok=False)
            base = module.get_base_layer()
            d_in, d_out = base.in_features, base.out_features
            rank = max(module.lora_A[n].weight.shape[0] for n in names if n in module.lora_A)
            ref = next(module.lora_A[n].weight for n in names if n in module.lora_A)
            a = ref.new_zeros(len(names) + 1, rank, d_in)
            b = ref.new_zeros(len(names) + 1, d_out, rank)
            for i, n in enumerate(names, start=1):
                if n in module.lora_A:
                    w_a, w_b = module.lora_A[n].weight, module.lora_B[n].weight
                    a[i, : w_a.shape[0]] = w_a
                    b[i, :, : w_b.shape[1]] = w_b * module.scaling[n]
            layers[module] = (a, b)
        return cls(tuple(names), layers, ok=True)

    def select(self, adapters: Sequence[str]) -> None:
        """The rows' adapters for the next forward (``__base__`` or a loaded PEFT name)."""
        key = tuple(adapters)
        if key != self._key:
            self._key = key
            device = next(iter(self.layers.values()))[0].device if self.layers else "cpu"
            self._idx = torch.tensor([self._slot.get(a, 0) for a in adapters], device=device)
            self._rows.clear()  # gathered per layer on first use for this row set

    def _delta(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows.get(module)
        if rows is None:
            a, b = self.layers[module]
            rows = (a[self._idx].transpose(1, 2), b[self._idx].transpose(1, 2))  # [B, d_in, r], [B, r, d_out]
            self._rows[module] = rows
        return torch.bmm(torch.bmm(x.to(rows[0].dtype), rows[0]), rows[1])

    @contextlib.contextmanager
    def active(self, model: Any) -> Iterator[None]:
        """PEFT's LoRA path off, the stacked path on (hooks removed and adapters re-enabled on exit)."""
        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return output + self._delta(module, args[0]).to(output.dtype)

        handles = [m.register_forward_hook(hook) for m in self.layers]
        try:
            with model.disable_adapter():
                yield
        finally:
            for h in handles:
                h.remove()
            self._key, self._idx = (), None
            self._rows.clear()
