"""``inflora``: InfLoRA (Liang & Li, CVPR 2024) and, as ``mode: fot``, FOT-style update projection
(Bakman et al. 2023, "Federated Orthogonal Training"); GPM bases (Saha et al. 2021). methods.md §9.

Idea: if a task's update satisfies ``DeltaW U = 0`` and earlier tasks' module inputs lie in
``span(U)``, the update does not change earlier tasks' outputs at that module.

Changes during training:

* ``design`` (InfLoRA [code]): with earlier adapters active (folded), stream the task's inputs of
  every target module (non-pad tokens, eval mode) into ``C = X X^T / N``; ``A_t`` = the top-``r``
  eigenvectors of ``C`` restricted to the free subspace ``span(U)^perp``, divided by ``sqrt(3)``,
  and **frozen**: only ``B_t`` trains, so ``A_t U = 0`` holds for any optimizer.
* ``fot`` [cladapt]: ``A_t`` and ``B_t`` train; the initial ``A_t`` is projected and ``post_step``
  re-projects ``A_t <- A_t - (A_t U) U^T`` after every optimizer step (Adam-safe, methods.md §0.2);
  ``project_grads`` also projects the gradient in ``pre_step`` (exact only for SGD).

Modules called on the same input tensor (``q_proj``/``v_proj`` of a layer) share one input key,
one covariance and one basis. After training, the covariances are recomputed with the trained
model and ``U <- update_basis(U, C, eps_t)`` with ``eps_t = min(0.99, 0.95 + 0.005 (t - 1))``,
``t`` = this task's position in the summed sequence (earlier summed versions + 1).

Persists (cumulative): ``bases.safetensors`` with ``<key>.U`` ``[d_in, k]`` fp32 (or ``<key>.M``, the
complement, once ``k > d_in / 2``: DualGPM "retain" mode) and ``<key>.mode`` int8; ``bases.json``
with ``eps_t``, ``t``, per-key ``k``/captured energy, tokens used and the module -> key map.

Deviations: [cladapt] the free-subspace design takes eigenvectors of ``F^T C F`` with ``F`` an exact
orthonormal complement of ``U`` (same subspace as the official SVD of ``(I - U U^T) C``, but stays
in the free subspace even when ``C`` has fewer than ``r`` non-zero directions). Energies are
squared singular values (FOT's code uses the unsquared norm ratio). Only summed versions trained
by this method contribute bases (input subspaces cannot be recovered from adapter tensors).
``k + r > d_in`` is a CapacityError before training. PEFT's ``alpha / r`` scaling is kept; the
preset sets ``alpha = r`` (scaling 1), as the official forward adds ``B @ A`` unscaled.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field
from typing_extensions import override

from cladapt import distributed
from cladapt.adapters.base import CLMethod, Composition, History, MethodConfig, Sidecars, TaskSpec
from cladapt.adapters.linalg import (
    complement,
    eps_schedule,
    pack_basis,
    project_rows,
    union_basis,
    unpack_basis,
    update_basis,
)
from cladapt.adapters.lora_layers import (
    InputStats,
    check_sum_capacity,
    factor_params,
    in_out,
    input_covariances,
    lora_layers,
)
from cladapt.errors import CapacityError, CladaptError

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

SIDECAR = "bases"


class InfLoRAConfig(MethodConfig):
    name: str = Field("inflora", description="method name")
    mode: Literal["design", "fot"] = Field(
        "design", description="design: A from the free input subspace, frozen (InfLoRA); fot: A trained, re-projected"
    )
    eps_start: float = Field(0.95, gt=0, le=1, description="energy threshold of the first task's basis")
    eps_step: float = Field(0.005, ge=0, description="threshold increase per task")
    eps_max: float = Field(0.99, gt=0, le=1, description="threshold cap")
    project_grads: bool = Field(False, description="fot: also project gradients in pre_step (exact only for SGD)")
    max_batches: int | None = Field(None, ge=1, description="batches used for input covariances (None: all)")


def read_bases(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``bases`` sidecar tensors -> input key -> ``U`` ``[d_in, k]``."""
    out = {}
    for name, t in tensors.items():
        key, _, kind = name.rpartition(".")
        if kind in ("U", "M"):
            out[key] = unpack_basis(t, int(tensors[f"{key}.mode"].reshape(-1)[0]))
    return out


def write_bases(bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, u in bases.items():
        stored, mode = pack_basis(u)
        out[f"{key}.{'M' if mode else 'U'}"] = stored
        out[f"{key}.mode"] = torch.tensor([mode], dtype=torch.int8)
    return out


class InfLoRA(CLMethod):
    name: ClassVar[str] = "inflora"
    summary: ClassVar[str] = "A in the free input subspace of earlier tasks (frozen; fot: re-projected); summed"
    Config = InfLoRAConfig
    composition: ClassVar[Composition] = "sum"
    config: InfLoRAConfig

    def __init__(self, config: InfLoRAConfig, lora: Any) -> None:
        super().__init__(config, lora)
        self._layers: dict[str, Any] = {}
        self.u_prev: dict[str, torch.Tensor] = {}  # module -> [d_in, k] basis of earlier inputs
        self.t = 1

    def _loader(self, task: TaskSpec) -> Any:
        if task.dataloader is None:
            raise CladaptError(f"{self.name} needs the task's training batches to estimate input subspaces")
        n = self.config.max_batches
        return itertools.islice(task.dataloader, n) if n else task.dataloader

    def _covariances(self, model: PeftModel, task: TaskSpec) -> InputStats:
        """Input covariances over the task's batches, pooled over processes.

        With several processes each one streams its share of the batches and the token-weighted
        sums are added up, so every process gets the covariance one process computes over the
        same batches (and the same designed ``A`` and bases, whatever the number of processes).
        """
        n = len(task.dataloader) if self.config.max_batches is None else min(self.config.max_batches, len(task.dataloader))
        if not distributed.split_evenly(n):
            return input_covariances(model, self._layers, self._loader(task))
        share = distributed.share(n)
        mine = itertools.islice(self._loader(task), share.start, share.stop, share.step)
        stats = input_covariances(model, self._layers, mine)
        tokens = int(distributed.all_reduce_sum(torch.tensor(stats.tokens, dtype=torch.int64)))
        for key, cov in stats.cov.items():
            stats.cov[key] = distributed.all_reduce_sum(cov.double() * stats.tokens).div_(tokens).float()
        stats.tokens = tokens
        return stats

    def earlier_bases(self, history: History) -> dict[str, torch.Tensor]:
        """Module path -> union of the stored bases of every summed version of this method."""
        per_module: dict[str, list[torch.Tensor]] = {}
        for e in self.summed_history(history):
            if e.method != self.name:
                continue
            by_key = read_bases(history.sidecar_tensors(e.ref, SIDECAR))
            for module, key in history.sidecar_json(e.ref, SIDECAR)["module_key"].items():
                if key in by_key:
                    per_module.setdefault(module, []).append(by_key[key])
        return {m: union_basis(us, us[0].shape[0]) for m, us in per_module.items()}

    # -- prepare ------------------------------------------------------------------------------

    @override
    def prepare(self, model: PeftModel, task: TaskSpec, history: History) -> None:
        summed = self.summed_history(history)
        check_sum_capacity(model, history, summed, self.name)
        self.t = len(summed) + 1
        self._layers = lora_layers(model)
        earlier = self.earlier_bases(history)
        problems = []
        for path, layer in self._layers.items():
            d_in, _ = in_out(layer)
            self.u_prev[path] = earlier.get(path, torch.zeros(d_in, 0))
            k = self.u_prev[path].shape[1]
            if k + self.lora.r > d_in:
                problems.append(f"{path}: basis k={k} + r={self.lora.r} > d_in={d_in}")
        if problems:
            raise CapacityError(
                f"{self.name}: earlier tasks' input subspaces leave no room: " + "; ".join(problems[:4]),
                hint="lower lora.r or eps_max, or start a new sequence",
            )
        if self.config.mode == "design":
            self._design(model, task)
        else:
            with torch.no_grad():
                for path, layer in self._layers.items():
                    a, _ = factor_params(layer)
                    a.copy_(project_rows(a, self.u_prev[path]))

    def _design(self, model: PeftModel, task: TaskSpec) -> None:
        stats = self._covariances(model, task)
        for key, cov in stats.cov.items():
            members = [m for m, k in stats.module_key.items() if k == key]
            d = cov.shape[0]
            u = union_basis([self.u_prev[m] for m in members], d)
            free = complement(u, d)  # [d, d - k]
            if free.shape[1] < self.lora.r:  # members' bases differ (target set changed): their union is fuller
                raise CapacityError(
                    f"{self.name}: input key {key}: free dimension {free.shape[1]} < r={self.lora.r}",
                    hint="lower lora.r or eps_max, or start a new sequence",
                )
            lam, vec = torch.linalg.eigh(free.T @ cov @ free)
            top = free @ vec[:, torch.argsort(lam, descending=True)[: self.lora.r]]  # [d, r]
            a_t = top.T / math.sqrt(3.0)  # [code] InfLoRA scales the designed A by 1/sqrt(3)
            with torch.no_grad():
                for m in members:
                    a, _ = factor_params(self._layers[m])
                    a.copy_(a_t.to(a))
                    a.requires_grad_(False)  # frozen: A_t U = 0 whatever the optimizer does to B
        logger.info("%s: designed A for %d input keys from %d tokens", self.name, len(stats.cov), stats.tokens)

    # -- training hooks (fot) --------------------------------------------------------------------

    @override
    def pre_step(self, model: PeftModel) -> None:
        if self.config.mode != "fot" or not self.config.project_grads:
            return
        for path, layer in self._layers.items():
            a, _ = factor_params(layer)
            if a.grad is not None:
                a.grad.copy_(project_rows(a.grad, self.u_prev[path]))

    @override
    @torch.no_grad()
    def post_step(self, model: PeftModel) -> None:
        if self.config.mode != "fot":
            return
        for path, layer in self._layers.items():
            a, _ = factor_params(layer)
            a.copy_(project_rows(a, self.u_prev[path]))

    # -- finalize --------------------------------------------------------------------------------

    def residual(self) -> dict[str, float]:
        """``||A_t U|| / ||A_t||`` per module: 0 up to round-off by construction."""
        out = {}
        for path, layer in self._layers.items():
            a, _ = factor_params(layer)
            u = self.u_prev[path].to(a.device)
            out[path] = float((a.detach().float() @ u).norm() / a.detach().float().norm().clamp_min(1e-12))
        return out

    def grow_bases(self, stats: InputStats, eps: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        bases, info = {}, {}
        for key, cov in stats.cov.items():
            members = [m for m, k in stats.module_key.items() if k == key]
            u = union_basis([self.u_prev[m] for m in members], cov.shape[0])
            bases[key], info[key] = update_basis(u, cov, eps)
            info[key]["d_in"] = cov.shape[0]
        return bases, info

    @override
    @torch.no_grad()
    def finalize(self, model: PeftModel, task: TaskSpec) -> Sidecars:
        c = self.config
        eps = eps_schedule(self.t, c.eps_start, c.eps_step, c.eps_max)
        stats = self._covariances(model, task)
        bases, info = self.grow_bases(stats, eps)
        residual = self.residual()
        summary = {
            "mode": c.mode,
            "t": self.t,
            "eps_t": eps,
            "tokens": stats.tokens,
            "module_key": stats.module_key,
            "keys": info,
            "residual": residual,
        }
        metrics = {f"{self.name}_max_residual": max(residual.values(), default=0.0)}
        return Sidecars(tensors={SIDECAR: write_bases(bases)}, json={SIDECAR: summary}, metrics=metrics)
