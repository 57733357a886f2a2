"""``inc-lora``: a new LoRA per task, earlier ones frozen and summed (IncLoRA; methods.md §1).

Paper: the IncLoRA baseline of O-LoRA (Wang et al. 2023) = O-LoRA with ``lambda1 = lambda2 = 0``:
it isolates the effect of O-LoRA's orthogonality penalty.

Changes during training: nothing beyond LoRA. The trainer folds every earlier summed adapter
exactly into the frozen base weights (``adapters.compose.folded``), so earlier adapters are active
and untouched; only the new adapter trains.

Persists: the plain PEFT adapter. Composition ``sum``: all sum-composed versions are served as one
rank-concatenated LoRA (methods.md §10).

Deviations: [cladapt] a summed rank that the rank-concatenated export cannot hold (``sum r > d_in``)
is refused with a CapacityError before training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field
from typing_extensions import override

from cladapt.adapters.base import CLMethod, Composition, History, MethodConfig, TaskSpec
from cladapt.adapters.lora_layers import check_sum_capacity

if TYPE_CHECKING:
    from peft import PeftModel


class IncLoRAConfig(MethodConfig):
    name: str = Field("inc-lora", description="method name")


class IncLoRA(CLMethod):
    name: ClassVar[str] = "inc-lora"
    summary: ClassVar[str] = "new LoRA per task; earlier ones frozen and summed, no penalty"
    Config = IncLoRAConfig
    composition: ClassVar[Composition] = "sum"
    supports_zero3: ClassVar[bool] = True

    @override
    def prepare(self, model: PeftModel, task: TaskSpec, history: History) -> None:
        check_sum_capacity(model, history, self.summed_history(history), self.name)
