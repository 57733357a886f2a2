"""``lora``: one fresh, independent LoRA per task on the frozen base (methods.md §1).

Nothing from earlier tasks is active while training, so earlier adapters cannot be harmed; at
inference a task id (oracle) or a router picks the adapter. With oracle routing this is the
practical upper bound of isolation methods. Persists nothing beyond the plain PEFT adapter.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from cladapt.adapters.base import CLMethod, Composition, MethodConfig


class LoRAConfig(MethodConfig):
    name: str = Field("lora", description="method name")


class LoRA(CLMethod):
    name: ClassVar[str] = "lora"
    summary: ClassVar[str] = "fresh independent LoRA per task; served by task id or a router"
    Config = LoRAConfig
    composition: ClassVar[Composition] = "route"
    supports_zero3: ClassVar[bool] = True
