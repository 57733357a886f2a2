"""``StoreHistory``: the registry seen by a method as a read-only :class:`History`.

Only versions trained on the same base model (fingerprint) are visible, and every tensor read
is sha256-verified by the store. Methods never see the store itself.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch
from safetensors.torch import load_file

from cladapt.adapters.base import HistoryEntry
from cladapt.adapters.compose import normalize_state
from cladapt.registry.store import Store


class StoreHistory:
    """Active versions of a registry on one base model, oldest first."""

    def __init__(self, store: Store, *, base_fingerprint: str, current_task: str) -> None:
        self.store = store
        self.current_task = current_task
        everything = store.list()
        records = [
            r
            for r in everything
            if r.status == "active" and r.manifest.base_model.get("fingerprint") == base_fingerprint
        ]
        records.sort(key=lambda r: (r.created, r.task, r.version))
        #: active versions of other tasks trained on another base model: invisible to methods (an
        #: adapter only applies to its own base), listed so a run can say what it leaves out
        self.elsewhere: list[tuple[str, str, str]] = [
            (f"{r.task}@{r.version}", r.composition, str(r.manifest.base_model.get("id", "?")))
            for r in sorted(everything, key=lambda r: (r.created, r.task, r.version))
            if r.status == "active" and r.task != current_task
            and r.manifest.base_model.get("fingerprint") != base_fingerprint
        ]
        self._entries = [
            HistoryEntry(
                ref=f"{r.task}@{r.version}",
                task=r.task,
                version=r.version,
                method=r.method,
                composition=r.composition,
                lora=dict(r.manifest.lora),
                created=r.created,
            )
            for r in records
        ]
        self.state_cache = lru_cache(maxsize=64)(self._load_state)

    def versions(self) -> list[HistoryEntry]:
        return [e for e in self._entries if e.task != self.current_task]

    def latest(self, method: str) -> HistoryEntry | None:
        matching = [e for e in self._entries if e.method == method]
        return matching[-1] if matching else None

    def _load_state(self, ref: str) -> dict[str, torch.Tensor]:
        folder = self.store.adapter_dir(ref)
        return normalize_state(load_file(str(folder / "adapter_model.safetensors")))

    def adapter_state(self, ref: str) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state_cache(ref).items()}

    def adapter_config(self, ref: str) -> dict[str, Any]:
        return json.loads((self.store.adapter_dir(ref) / "adapter_config.json").read_text())

    def sidecar_tensors(self, ref: str, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.store.sidecar_path(ref, f"{name}.safetensors")))

    def sidecar_json(self, ref: str, name: str) -> dict[str, Any]:
        return json.loads(self.store.sidecar_path(ref, f"{name}.json").read_text())
