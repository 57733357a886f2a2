"""Helpers for the method tests: an in-memory History, a tiny PEFT model, a miniature trainer loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cladapt.adapters.base import TRAIN_ADAPTER, CLMethod, HistoryEntry, LoraSpec, TaskSpec


class FakeHistory:
    """A read-only :class:`History` kept in memory (what a method sees of the registry)."""

    def __init__(self, current_task: str = "current") -> None:
        self.current_task = current_task
        self.entries: list[HistoryEntry] = []
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.tensors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.jsons: dict[tuple[str, str], dict[str, Any]] = {}

    def add(
        self,
        task: str,
        method: str,
        composition: str,
        state: dict[str, torch.Tensor],
        *,
        r: int,
        alpha: float,
        targets: list[str],
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        jsons: dict[str, dict[str, Any]] | None = None,
    ) -> str:
        version = 1 + sum(e.task == task for e in self.entries)
        ref = f"{task}@{version}"
        lora = {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": targets}
        self.entries.append(
            HistoryEntry(ref, task, version, method, composition, lora, f"2025-01-0{len(self.entries) + 1}")
        )  # type: ignore[arg-type]
        self.states[ref] = {k: v.detach().clone().float() for k, v in state.items()}
        self.configs[ref] = {"r": r, "lora_alpha": alpha, "target_modules": targets}
        for name, t in (tensors or {}).items():
            self.tensors[(ref, name)] = {k: v.detach().clone() for k, v in t.items()}
        for name, j in (jsons or {}).items():
            self.jsons[(ref, name)] = j
        return ref

    def add_finished(self, task: str, method: CLMethod, model: Any, sidecars: Any) -> str:
        """Record the adapter "default" of ``model`` and ``sidecars`` as a finished version."""
        return self.add(
            task,
            method.name,
            method.composition,
            adapter_state(model),
            r=method.lora.r,
            alpha=method.lora.alpha,
            targets=list(method.lora.target_modules),
            tensors=sidecars.tensors,
            jsons=sidecars.json,
        )

    def versions(self) -> list[HistoryEntry]:
        return [e for e in self.entries if e.task != self.current_task]

    def latest(self, method: str) -> HistoryEntry | None:
        found = [e for e in self.entries if e.method == method]
        return found[-1] if found else None

    def adapter_config(self, ref: str) -> dict[str, Any]:
        return dict(self.configs[ref])

    def adapter_state(self, ref: str) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states[ref].items()}

    def sidecar_tensors(self, ref: str, name: str) -> dict[str, torch.Tensor]:
        return self.tensors[(ref, name)]

    def sidecar_json(self, ref: str, name: str) -> dict[str, Any]:
        return self.jsons[(ref, name)]


def adapter_state(model: Any, adapter: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed like ``History.adapter_state``."""
    from cladapt.adapters.lora_layers import factor_params, lora_layers

    out = {}
    for path, layer in lora_layers(model, adapter).items():
        a, b = factor_params(layer, adapter)
        out[f"{path}.lora_A.weight"] = a.detach().clone().float()
        out[f"{path}.lora_B.weight"] = b.detach().clone().float()
    return out


def make_method(
    name: str, *, r: int = 4, lora_alpha: float = 8.0, targets: list[str] | None = None, **cfg: Any
) -> CLMethod:
    """A method with a small LoRA; ``cfg`` are method config fields."""
    from cladapt.adapters import METHODS

    cls = METHODS.get(name)
    lora = LoraSpec(r=r, alpha=lora_alpha, dropout=0.0, target_modules=targets or ["q_proj", "v_proj"])
    return cls(cls.Config(name=name, **cfg), lora)


def peft_model(base: Any, method: CLMethod, seed: int = 0) -> Any:
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, method.lora_config(base.config._name_or_path), adapter_name=TRAIN_ADAPTER)


def random_batches(
    vocab: int, n: int = 4, *, batch: int = 4, seq: int = 12, seed: int = 0, pad: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Token batches with answer labels on the second half and (optionally) right padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad:
            mask[0, seq - 3 :] = 0
            ids[0, seq - 3 :] = 2
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "row_index": torch.arange(batch)})
    return out


def task_spec(batches: list[dict[str, torch.Tensor]], seed: int = 0, **extra: Any) -> TaskSpec:
    return TaskSpec(
        name="current", rows=sum(len(b["input_ids"]) for b in batches), seed=seed, dataloader=batches, extra=extra
    )


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from cladapt.train.loop import answer_ce

    return answer_ce(logits, labels)


def train_steps(
    model: Any,
    method: CLMethod,
    batches: list[dict[str, torch.Tensor]],
    steps: int,
    *,
    lr: float = 1e-2,
    optimizer: str = "adamw",
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """The trainer's step order in miniature: loss + extra_losses, backward, pre_step, step, post_step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adamw" else torch.optim.SGD(params, lr=lr)
    )
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out = model(**inputs, use_cache=False, output_hidden_states=getattr(method, "needs_hidden_states", False))
        loss = loss_fn(out, batch) if loss_fn else ce(out.logits, batch["labels"])
        for v in method.extra_losses(model, batch, out).values():
            loss = loss + v
        loss.backward()
        method.pre_step(model)
        opt.step()
        with torch.no_grad():
            method.post_step(model)
        opt.zero_grad(set_to_none=True)
        if after_step:
            after_step(step)
