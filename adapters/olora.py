"""``olora``: O-LoRA, orthogonal subspace learning (Wang et al. 2023; methods.md §2).

Paper: "Orthogonal Subspace Learning for Language Model Continual Learning". Each task learns a
LoRA whose ``A`` rows are pushed orthogonal to the ``A`` rows of every earlier task; all adapters
are summed at inference, so no task id is needed.

Changes during training (the trainer folds earlier summed adapters into the frozen base; that is
exact and keeps the step cost flat, methods.md §2 "Overhead")::

    L = CE + lambda1 * sum_modules penalty(A_prev_concat @ A_t^T)         # "orth"
           + lambda2 * sum_modules (||A_t||_F + ||B_t||_F)                 # "l2", NOT squared
    penalty = sum |.| ("abs", official code [code]) or sum (.)^2 ("sq", paper [2nd])

``A_prev_concat`` is the row-concatenation of the ``A`` of every summed earlier version, read from
the history's adapter tensors (the "prev" concat is derived, never stored).

Persists: the plain PEFT adapter and ``olora.json``: lambdas, penalty, and per module the
scale-free overlap ``||rownorm(A_prev) rownorm(A_t)^T||_F`` (monitor this, not the raw penalty:
shrinking ``A`` while growing ``B`` lowers the raw value without changing ``B A``).

Deviations: [cladapt] the earlier adapters are folded into the base weights instead of kept as a
frozen rank-concatenated branch (same function; dropout on the frozen branch is not reproduced,
it is inactive at inference anyway). ``r_sum + r > d_in`` (exact orthogonality impossible, and
the export cannot hold it) is a CapacityError before training. Penalties are computed in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field
from typing_extensions import override

from cladapt.adapters.base import CLMethod, Composition, History, MethodConfig, Sidecars, TaskSpec
from cladapt.adapters.linalg import normalized_overlap, overlap_penalty
from cladapt.adapters.lora_layers import check_sum_capacity, factor_params, lora_layers, previous_factors

if TYPE_CHECKING:
    from peft import PeftModel


class OLoRAConfig(MethodConfig):
    name: str = Field("olora", description="method name")
    lambda1: float = Field(0.5, ge=0, description="weight of the orthogonality penalty between A_prev and A_t")
    lambda2: float = Field(0.0, ge=0, description="weight of the (unsquared) Frobenius norms of A_t and B_t")
    penalty: Literal["abs", "sq"] = Field(
        "abs", description="overlap penalty: sum of |entries| (official code) or of squared entries (paper)"
    )


class OLoRA(CLMethod):
    name: ClassVar[str] = "olora"
    summary: ClassVar[str] = "new LoRA per task with A orthogonal (penalty) to earlier tasks' A; summed"
    Config = OLoRAConfig
    composition: ClassVar[Composition] = "sum"
    config: OLoRAConfig

    def __init__(self, config: OLoRAConfig, lora: Any) -> None:
        super().__init__(config, lora)
        self._layers: dict[str, Any] = {}
        self._prev: dict[str, torch.Tensor] = {}  # module -> A_prev_concat [r_sum, d_in] fp32

    @override
    def prepare(self, model: PeftModel, task: TaskSpec, history: History) -> None:
        summed = self.summed_history(history)
        check_sum_capacity(model, history, summed, self.name)
        self._layers = lora_layers(model)
        prev = previous_factors(history, summed)
        self._prev = {p: torch.cat([ab["A"] for ab in prev[p]], dim=0) for p in self._layers if p in prev}

    def _a_prev(self, path: str, device: torch.device) -> torch.Tensor:
        a = self._prev[path]
        if a.device != device:  # the trainer may move the model after prepare
            a = self._prev[path] = a.to(device)
        return a

    @override
    def extra_losses(self, model: PeftModel, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        orth: torch.Tensor | int = 0
        l2: torch.Tensor | int = 0
        for path, layer in self._layers.items():
            a, b = factor_params(layer)
            if path in self._prev and self.config.lambda1:
                orth = orth + overlap_penalty(self._a_prev(path, a.device), a, self.config.penalty)
            if self.config.lambda2:
                l2 = l2 + a.float().norm() + b.float().norm()
        zero = torch.zeros((), device=factor_params(next(iter(self._layers.values())))[0].device)
        return {"orth": self.config.lambda1 * (orth + zero), "l2": self.config.lambda2 * (l2 + zero)}

    def overlaps(self) -> dict[str, float]:
        """Per-module normalized overlap of the current ``A_t`` with ``A_prev_concat``."""
        return {
            path: normalized_overlap(self._prev[path], factor_params(layer)[0])
            for path, layer in self._layers.items()
            if path in self._prev
        }

    @override
    def finalize(self, model: PeftModel, task: TaskSpec) -> Sidecars:
        overlaps = self.overlaps()
        summary = {
            "lambda1": self.config.lambda1,
            "lambda2": self.config.lambda2,
            "penalty": self.config.penalty,
            "modules": len(self._layers),
            "prev_rank": {p: int(a.shape[0]) for p, a in self._prev.items()},
            "normalized_overlap": overlaps,
        }
        metrics = {"olora_max_overlap": max(overlaps.values(), default=0.0)}
        return Sidecars(json={"olora": summary}, metrics=metrics)
