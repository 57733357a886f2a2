"""``seq-lora``: one LoRA continued task after task (SeqLoRA in O-LoRA; methods.md §1).

Paper: Wang et al. 2023 (O-LoRA) report it as the naive lower bound. Training task t starts from
the tensors of the newest ``seq-lora`` version (of any task) and continues training them; optimizer
state and the LR schedule restart at every task **[code]**. Nothing else is active, so earlier
tasks are protected by nothing: this measures plain forgetting.

Persists: only the adapter. Every version is kept (lineage: ``parents = [the version it continued]``),
so version t's initial tensors are exactly version t-1's final ones.

Deviations: none. [cladapt] the continued adapter must have the same rank, alpha and target
modules as the one it continues (otherwise it is not a continuation); a mismatch is an error
raised before training.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field
from typing_extensions import override

from cladapt.adapters.base import CLMethod, Composition, History, MethodConfig, TaskSpec
from cladapt.adapters.lora_layers import factor_params, lora_layers
from cladapt.errors import CladaptError

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)


class SeqLoRAConfig(MethodConfig):
    name: str = Field("seq-lora", description="method name")


class SeqLoRA(CLMethod):
    name: ClassVar[str] = "seq-lora"
    summary: ClassVar[str] = "one LoRA continued task after task (naive lower bound)"
    Config = SeqLoRAConfig
    composition: ClassVar[Composition] = "single"
    freezes_history: ClassVar[bool] = False
    supports_zero3: ClassVar[bool] = True

    @override
    def prepare(self, model: PeftModel, task: TaskSpec, history: History) -> None:
        prev = history.latest(self.name)
        if prev is None:
            logger.info("seq-lora: no earlier version, starting a fresh adapter")
            return
        self._check_same_shape(prev.lora, prev.ref)
        state = history.adapter_state(prev.ref)
        layers = lora_layers(model)
        missing = sorted({p for p in layers if f"{p}.lora_A.weight" not in state})
        extra = sorted({k.rsplit(".lora_", 1)[0] for k in state} - set(layers))
        if missing or extra:
            raise CladaptError(
                f"seq-lora cannot continue {prev.ref}: modules differ (missing {missing[:3]}, extra {extra[:3]})",
                hint=f"use the same lora.target_modules as {prev.ref}",
            )
        with torch.no_grad():
            for path, layer in layers.items():
                a, b = factor_params(layer)
                a.copy_(state[f"{path}.lora_A.weight"].to(a))
                b.copy_(state[f"{path}.lora_B.weight"].to(b))
        logger.info("seq-lora: continuing %s", prev.ref)

    def _check_same_shape(self, prev_lora: dict[str, Any], ref: str) -> None:
        def norm(key: str, value: Any) -> Any:
            return sorted(value) if key == "target_modules" else value

        mine = self.lora.model_dump()
        diffs = [
            f"{k}: {prev_lora[k]!r} there, {mine[k]!r} here"
            for k in ("r", "alpha", "target_modules")
            if k in prev_lora and norm(k, prev_lora[k]) != norm(k, mine[k])
        ]
        if diffs:
            raise CladaptError(
                f"seq-lora cannot continue {ref}: its LoRA shape differs ({'; '.join(diffs)})",
                hint="continue with the same lora settings, or start a new chain with another method",
            )

    @override
    def parents(self, history: History) -> list[str]:
        prev = history.latest(self.name)
        return [prev.ref] if prev is not None else []
