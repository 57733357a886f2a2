"""``reglora``: RegLoRA of SEFE (Chen et al., ICML 2025; methods.md §4.2).

Paper: "SEFE: Superficial and Essential Forgetting Eliminator for Multimodal Continual Instruction
Tuning". After each task, the ``M = 2 %`` largest entries of ``|B @ A|`` (unscaled, fp32) are that
task's *key elements*; later tasks are penalized for changing the weights at the union of all
earlier key positions, and free everywhere else [code].

Changes during training::

    L = CE + lambda * (1 / N_mod) * sum_m mean_{(i,j) in Mask_m} |(B_t @ A_t)[i, j]|     # "reg"

computed in gather form, ``(B[rows] * A[:, cols].T).sum(1)``, while the union mask covers at most
6 % of a module, and as a dense masked ``|B @ A|`` above that [cladapt, measured: the gather's cost
grows with every task's mask and passes the dense product's between 2 % and 14 % coverage; the
dense form keeps the step time flat in the number of tasks]; ``N_mod`` = number of modules with a non-empty mask.

Persists: the plain PEFT adapter; ``reglora_mask.safetensors`` with, per module, the *union* mask
packed row-major with ``numpy.packbits`` (``<module>``, uint8) and its shape (``<module>.shape``,
int64 ``[d_out, d_in]``); ``reglora.json`` with M, lambda, the targets, per-module ``k`` of this task,
union size and coverage.

Deviations: [cladapt] adapters stay separate and are summed (the official code merges each adapter
into the base); the trainer folds earlier ones into the frozen base, which is the same function.
Key positions of earlier summed versions trained by *other* methods are derived from their adapter
tensors, so the penalty protects every summed task. Ties at the k-th value are broken by
``torch.topk`` (arbitrary). A module whose mask covers > ``warn_coverage`` of its entries is warned
about (the penalty then freezes most of it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field
from typing_extensions import override

from cladapt.adapters.base import CLMethod, Composition, History, MethodConfig, Sidecars, TaskSpec
from cladapt.adapters.linalg import masked_update_abs_mean, packbits, topk_mask, unpackbits
from cladapt.adapters.lora_layers import check_sum_capacity, factor_params, lora_layers, previous_factors

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

SIDECAR = "reglora_mask"


class RegLoRAConfig(MethodConfig):
    name: str = Field("reglora", description="method name")
    lambda_reg: float = Field(2500.0, ge=0, description="weight of the key-element penalty (tied to unscaled B @ A)")
    percent: float = Field(2.0, gt=0, le=100, description="M: share (%) of |B @ A| entries kept as key elements")
    warn_coverage: float = Field(0.5, gt=0, le=1, description="warn when a module's union mask covers this share")


def read_masks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``reglora_mask`` sidecar tensors -> module path -> boolean ``[d_out, d_in]``."""
    return {
        key: unpackbits(packed, tensors[f"{key}.shape"].tolist())
        for key, packed in tensors.items()
        if not key.endswith(".shape")
    }


def write_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path, mask in masks.items():
        out[path] = packbits(mask)
        out[f"{path}.shape"] = torch.tensor(list(mask.shape), dtype=torch.int64)
    return out


class RegLoRA(CLMethod):
    name: ClassVar[str] = "reglora"
    summary: ClassVar[str] = "new LoRA per task; L1 penalty on its update at earlier tasks' top-M% positions; summed"
    Config = RegLoRAConfig
    composition: ClassVar[Composition] = "sum"
    config: RegLoRAConfig

    def __init__(self, config: RegLoRAConfig, lora: Any) -> None:
        super().__init__(config, lora)
        self._layers: dict[str, Any] = {}
        self.union: dict[str, torch.Tensor] = {}  # module -> boolean [d_out, d_in] union of earlier masks
        self._index: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (rows, cols) int64
        self._masks: dict[str, torch.Tensor] = {}  # module -> boolean union mask (on the module's device)

    def earlier_masks(self, history: History) -> dict[str, torch.Tensor]:
        """Union of the key-element masks of every summed earlier version."""
        union: dict[str, torch.Tensor] = {}

        def add(path: str, mask: torch.Tensor) -> None:
            union[path] = union[path] | mask if path in union else mask

        summed = self.summed_history(history)
        for e in summed:
            if e.method == self.name:
                for path, mask in read_masks(history.sidecar_tensors(e.ref, SIDECAR)).items():
                    add(path, mask)
        for path, abs_ in previous_factors(history, [e for e in summed if e.method != self.name]).items():
            for ab in abs_:
                add(path, topk_mask((ab["B"] @ ab["A"]).abs(), self.config.percent)[0])
        return union

    @override
    def prepare(self, model: PeftModel, task: TaskSpec, history: History) -> None:
        check_sum_capacity(model, history, self.summed_history(history), self.name)
        self._layers = lora_layers(model)
        self.union = self.earlier_masks(history)
        for path in self._layers:
            mask = self.union.get(path)
            if mask is None or not bool(mask.any()):
                continue
            coverage = float(mask.float().mean())
            if coverage > self.config.warn_coverage:
                logger.warning("reglora: the key-element mask of %s covers %.0f%% of it", path, 100 * coverage)
            rows, cols = mask.nonzero(as_tuple=True)
            self._index[path] = (rows, cols)
            self._masks[path] = mask

    def _rows_cols(self, path: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = self._index[path]
        if rows.device != device:
            rows, cols = self._index[path] = (rows.to(device), cols.to(device))
        return rows, cols

    def reg_loss(self) -> torch.Tensor:
        """``(1/N_mod) sum_m mean |(B A)[Mask_m]|`` over modules with a non-empty mask (unscaled)."""
        terms = []
        for path, layer in self._layers.items():
            if path not in self._index:
                continue
            a, b = factor_params(layer)
            rows, cols = self._rows_cols(path, a.device)
            mask = self._masks[path]
            if mask.device != a.device:
                mask = self._masks[path] = mask.to(a.device)
            terms.append(masked_update_abs_mean(b, a, mask, rows, cols))
        if not terms:
            return torch.zeros((), device=factor_params(next(iter(self._layers.values())))[0].device)
        return torch.stack(terms).mean()

    @override
    def extra_losses(self, model: PeftModel, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        return {"reg": self.config.lambda_reg * self.reg_loss()}

    @override
    @torch.no_grad()
    def finalize(self, model: PeftModel, task: TaskSpec) -> Sidecars:
        masks: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        for path, layer in self._layers.items():
            a, b = factor_params(layer)
            own, k = topk_mask((b.float() @ a.float()).abs().cpu(), self.config.percent)  # unscaled, fp32
            prev = self.union.get(path)
            masks[path] = own | prev if prev is not None else own
            info[path] = {
                "k": k,
                "union": int(masks[path].sum()),
                "coverage": round(float(masks[path].float().mean()), 6),
            }
        summary = {
            "percent": self.config.percent,
            "lambda": self.config.lambda_reg,
            "targets": sorted(self.lora.target_modules),
            "regularized_modules": len(self._index),
            "modules": info,
        }
        metrics = {"reglora_max_coverage": max((v["coverage"] for v in info.values()), default=0.0)}
        return Sidecars(tensors={SIDECAR: write_masks(masks)}, json={"reglora": summary}, metrics=metrics)
