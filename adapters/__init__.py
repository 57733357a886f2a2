"""Continual-learning methods. ``METHODS`` is THE table of methods: one line per method.

Adding a method: ``adapters/<name>.py`` with a ``CLMethod`` subclass, one line here, and a preset
``configs/methods/<name>.yaml``. The test matrix enrols it automatically.
"""

from __future__ import annotations

from cladapt.adapters.base import CLMethod, LoraSpec, MethodConfig, Sidecars, TrainingPlugin
from cladapt.plugins import Registry

METHODS: Registry[CLMethod] = Registry(
    "method",
    base=CLMethod,
    entry_point_group="cladapt.methods",
    builtins={
        "lora": "cladapt.adapters.lora:LoRA",
        "seq-lora": "cladapt.adapters.seq_lora:SeqLoRA",
        "inc-lora": "cladapt.adapters.inc_lora:IncLoRA",
        "olora": "cladapt.adapters.olora:OLoRA",
        "owlora": "cladapt.adapters.owlora:OWLoRA",
        "reglora": "cladapt.adapters.reglora:RegLoRA",
        "inflora": "cladapt.adapters.inflora:InfLoRA",
        "gslora": "cladapt.adapters.gslora:GSLoRA",
    },
)

__all__ = ["METHODS", "CLMethod", "LoraSpec", "MethodConfig", "Sidecars", "TrainingPlugin"]
