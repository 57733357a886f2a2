"""``owlora``: weighted LoRA with gradient projection (OWLoRA of CoMEL, 2025; methods.md §3).

Paper: CoMEL, "Continual Multiple Instance Learning with Enhanced Localization for
Histopathological Whole Slide Image Analysis"; mechanics from the official code [code].

Changes during training:

* the task adapter is a *weighted* LoRA ``DeltaW_t = s * B_t diag(w_t) A_t`` with a learnable
  per-rank vector ``w_t`` (init 1), applied by a forward hook on ``lora_A``'s output;
  ``A ~ N(0, (1/r)^2)`` drawn from the task's own init seed (``TaskSpec.seed``: a hash of the
  train seed, the task and its place in the sequence), ``B = 0``;
* an intra-orthogonality penalty ``lambda_intra * mean_m (||A A^T - I||^2 + ||B^T B - I||^2) / r^2``
  pushes ``(B, w, A)`` towards a learned SVD. [cladapt] it is the *mean* over the adapted modules
  (the official code adapts a few modules; summed over the 60 q/v modules of a 30-layer model the
  penalty grows with the module count and outweighs the task CE), so ``lambda_intra`` means the
  same at any depth or target set; the initial ``A`` keeps the official N(0, (1/r)^2) rows;
* the row space of every earlier task's ``A`` (``P_A``) and the column space of its ``B`` (``P_B``)
  are projected out: of the initial ``A`` [cladapt], of the gradients in ``pre_step`` (official),
  and of the parameters in ``post_step`` [cladapt] -- projected gradients alone do not give
  projected updates under Adam (methods.md §0.2), the re-projection does.

Persists: the adapter exported as plain LoRA with ``w`` folded into ``B`` (``B' = B diag(w)``), and
``owlora_bases.safetensors``: ``<module>.QA [d_in, r]`` and ``<module>.QB [d_out, r]`` (fp32
orthonormal bases of this task's ``A`` rows and ``B'`` columns); ``owlora.json``.

Deviations: [cladapt] bases are orthonormalized (QR) and unioned, so the projection is exact even
if the intra penalty has not converged (the official ``A_j^T A_j`` is a projector only for
orthonormal rows). Earlier summed versions trained by other methods get bases derived from their
adapter tensors. The CoMEL initial-basis step is not ported (methods.md §3). PEFT's ``alpha / r``
scaling is kept (the preset sets ``alpha = r``, i.e. scaling 1, as the official code has none).
``k_A + r > d_in`` or ``k_B + r > d_out`` is a CapacityError before training.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field
from typing_extensions import override

from cladapt.adapters.base import TRAIN_ADAPTER, CLMethod, Composition, History, MethodConfig, Sidecars, TaskSpec
from cladapt.adapters.linalg import intra_orth_penalty, orth, project_cols, project_rows, union_basis
from cladapt.adapters.lora_layers import check_sum_capacity, factor_params, in_out, lora_layers, previous_factors
from cladapt.errors import CapacityError

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

SIDECAR = "owlora_bases"
#: name of the per-rank weight on a LoRA layer; contains "lora_" so mid-run checkpoints keep it
WEIGHT_ATTR = "lora_w"


class OWLoRAConfig(MethodConfig):
    name: str = Field("owlora", description="method name")
    lambda_intra: float = Field(1.0, ge=0, description="weight of the intra-orthogonality penalty on A and B")
    project_grads: bool = Field(True, description="also project gradients in pre_step (official); params always")
    w_clip: float | None = Field(None, gt=0, description="clamp |w| to this value after every step (None: off)")


class OWLoRA(CLMethod):
    name: ClassVar[str] = "owlora"
    summary: ClassVar[str] = "weighted LoRA B diag(w) A, intra-orthogonal, projected off earlier A/B spaces; summed"
    Config = OWLoRAConfig
    composition: ClassVar[Composition] = "sum"
    config: OWLoRAConfig

    def __init__(self, config: OWLoRAConfig, lora: Any) -> None:
        super().__init__(config, lora)
        self._layers: dict[str, Any] = {}
        self.p_a: dict[str, torch.Tensor] = {}  # module -> [d_in, k_A] union basis of earlier A rows
        self.p_b: dict[str, torch.Tensor] = {}  # module -> [d_out, k_B] union basis of earlier B columns
        self._hooks: list[Any] = []

    # -- prepare ------------------------------------------------------------------------------

    def _earlier_bases(self, history: History) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        summed = self.summed_history(history)
        out: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        derived = previous_factors(history, [e for e in summed if e.method != self.name])
        for path, abs_ in derived.items():
            qa, qb = out.setdefault(path, ([], []))
            for ab in abs_:
                qa.append(orth(ab["A"].T))
                qb.append(orth(ab["B"]))
        for e in summed:
            if e.method != self.name:
                continue
            for key, t in history.sidecar_tensors(e.ref, SIDECAR).items():
                path, _, which = key.rpartition(".")
                out.setdefault(path, ([], []))[0 if which == "QA" else 1].append(t.float())
        return out

    @override
    def prepare(self, model: PeftModel, task: TaskSpec, history: History) -> None:
        check_sum_capacity(model, history, self.summed_history(history), self.name)
        self._layers = lora_layers(model)
        earlier = self._earlier_bases(history)
        problems = []
        for path, layer in self._layers.items():
            d_in, d_out = in_out(layer)
            qa, qb = earlier.get(path, ([], []))
            self.p_a[path], self.p_b[path] = union_basis(qa, d_in), union_basis(qb, d_out)
            r = self.lora.r
            if self.p_a[path].shape[1] + r > d_in or self.p_b[path].shape[1] + r > d_out:
                problems.append(
                    f"{path}: k_A {self.p_a[path].shape[1]} + r {r} vs d_in {d_in}, "
                    f"k_B {self.p_b[path].shape[1]} + r {r} vs d_out {d_out}"
                )
        if problems:
            raise CapacityError(
                "owlora: the earlier tasks' subspaces leave no room: " + "; ".join(problems[:4]),
                hint="lower lora.r, target other modules, or start a new sequence",
            )
        gen = torch.Generator().manual_seed(task.seed)
        with torch.no_grad():
            for path, layer in self._layers.items():
                a, b = factor_params(layer)
                init = torch.randn(a.shape, generator=gen) / a.shape[0]  # N(0, (1/r)^2) [code]
                a.copy_(project_rows(init, self.p_a[path]).to(a))  # [cladapt] project the initial A
                b.zero_()
                self._add_weight(layer, a.shape[0], a.device)

    def _add_weight(self, layer: Any, r: int, device: torch.device) -> None:
        weights = torch.nn.ParameterDict({TRAIN_ADAPTER: torch.nn.Parameter(torch.ones(r, device=device))})
        setattr(layer, WEIGHT_ATTR, weights)

        def scale(_mod: Any, _inp: Any, out: torch.Tensor, _layer: Any = layer) -> torch.Tensor:
            return out * getattr(_layer, WEIGHT_ATTR)[TRAIN_ADAPTER].to(out.dtype)

        self._hooks.append(layer.lora_A[TRAIN_ADAPTER].register_forward_hook(scale))

    # -- training hooks --------------------------------------------------------------------------

    @override
    def extra_losses(self, model: PeftModel, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        total: torch.Tensor | int = 0
        for layer in self._layers.values():
            a, b = factor_params(layer)
            total = total + intra_orth_penalty(a, b)
        # mean over modules: the penalty's weight against the CE must not grow with depth or targets
        return {"intra": self.config.lambda_intra * total / max(1, len(self._layers))}  # type: ignore[dict-item]

    @override
    def pre_step(self, model: PeftModel) -> None:
        if not self.config.project_grads:
            return
        for path, layer in self._layers.items():
            a, b = factor_params(layer)
            if a.grad is not None:
                a.grad.copy_(project_rows(a.grad, self.p_a[path]))
            if b.grad is not None:
                b.grad.copy_(project_cols(b.grad, self.p_b[path]))

    @override
    @torch.no_grad()
    def post_step(self, model: PeftModel) -> None:
        for path, layer in self._layers.items():
            a, b = factor_params(layer)
            a.copy_(project_rows(a, self.p_a[path]))
            b.copy_(project_cols(b, self.p_b[path]))
            if self.config.w_clip is not None:
                w = getattr(layer, WEIGHT_ATTR)[TRAIN_ADAPTER]
                w.clamp_(-self.config.w_clip, self.config.w_clip)

    # -- finalize --------------------------------------------------------------------------------

    @override
    @torch.no_grad()
    def finalize(self, model: PeftModel, task: TaskSpec) -> Sidecars:
        bases: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        for path, layer in self._layers.items():
            a, b = factor_params(layer)
            w = getattr(layer, WEIGHT_ATTR)[TRAIN_ADAPTER].detach().float()
            info[path] = {
                "k_A_before": int(self.p_a[path].shape[1]),
                "k_B_before": int(self.p_b[path].shape[1]),
                "w_min": float(w.min()),
                "w_max": float(w.max()),
                "intra_penalty": float(intra_orth_penalty(a, b)),
            }
            b.copy_((b.float() * w.to(b.device)[None, :]).to(b.dtype))  # export: plain LoRA, B' = B diag(w)
            delattr(layer, WEIGHT_ATTR)
            bases[f"{path}.QA"] = orth(a.T).cpu()
            bases[f"{path}.QB"] = orth(b).cpu()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        summary = {
            "lambda_intra": self.config.lambda_intra,
            "project_grads": self.config.project_grads,
            "modules": info,
        }
        return Sidecars(tensors={SIDECAR: bases}, json={"owlora": summary})
