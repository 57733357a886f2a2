"""Arrow: PEFT's own token-level routing among task LoRAs (Ostapenko et al. 2024; peft >= 0.18).

Not a re-implementation: the candidates' adapter folders are handed to ``peft.create_arrow_model``
with a ``peft.ArrowConfig``, and generation runs through the resulting model, where every LoRA
layer scores each token against each adapter's top right singular vector of ``B @ A`` and mixes the
top-k adapters by a softmax. Arrow therefore has no single adapter per request; the :class:`Route`
it returns (``combine="arrow"``) lists the experts with the prompt's mean routing probability per
adapter, averaged over its tokens and Arrow layers (read from PEFT's own prototypes through forward
hooks), so ``cladapt route`` and the routing benchmark can show and score its preference.

PEFT requires equal rank and equal target modules across the adapters; a registry that mixes them
is refused with the offending versions named. Arrow cannot be served by vLLM (one LoRA a request).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from cladapt.errors import CladaptError
from cladapt.serve.routers.base import QueryBatch, Route, Router, RouterConfig, TaskView
from cladapt.serve.routers.dtkr import mix

ROUTER_ADAPTER = "arrow_router"


class ArrowRouterConfig(RouterConfig):
    name: str = "arrow"
    experts: int = Field(3, ge=1, le=64, description="PEFT ArrowConfig.top_k: adapters mixed per token and layer")
    temperature: float = Field(1.0, gt=0, description="PEFT ArrowConfig.router_temperature")


def check_compatible(views: Sequence[TaskView]) -> None:
    """Arrow needs one rank and one set of target modules; name every version that differs."""
    if not views:
        return
    first = views[0]
    want = (int(first.lora["r"]), sorted(first.lora["target_modules"]))
    bad = [f"{v.ref} (r={v.lora['r']}, targets={sorted(v.lora['target_modules'])})" for v in views[1:]
           if (int(v.lora["r"]), sorted(v.lora["target_modules"])) != want]
    if bad:
        raise CladaptError(
            f"Arrow needs every adapter to share the rank and target modules of {first.ref} "
            f"(r={want[0]}, targets={want[1]}); these differ: {'; '.join(bad)}",
            hint="route these with dtkr or mos, or retrain them with the same --set lora.r / lora.target_modules",
        )


class ArrowRouter(Router):
    name = "arrow"
    summary = "PEFT's Arrow: per-token, per-layer mixing of the task LoRAs by their top singular vectors"
    Config = ArrowRouterConfig
    needs_signatures = False
    needs_model = True

    def __init__(self, config: RouterConfig | None = None) -> None:
        super().__init__(config)
        self.cfg: ArrowRouterConfig = self.config  # type: ignore[assignment]
        self._base: Any = None
        self._tokenizer: Any = None
        self.model: Any = None  # the PEFT Arrow model; generation for "arrow" routes runs through it
        self._built_for: list[str] = []

    def bind_model(self, model: Any, tokenizer: Any) -> None:
        """Give the router a base model of its own (PEFT wraps it in place) and its tokenizer."""
        self._base, self._tokenizer = model, tokenizer

    def _fit_one(self, view: TaskView) -> None:
        check_compatible(list(self.tasks.values()))
        if view.adapter_dir is None:
            raise CladaptError(f"Arrow needs the adapter weights of {view.ref}")

    def _drop_one(self, ref: str) -> None:
        self._built_for = []  # rebuilt on the next route

    def build(self) -> Any:
        """The PEFT Arrow model over the current candidates (rebuilt when they changed)."""
        from peft import ArrowConfig, create_arrow_model

        refs = self.candidates
        if self.model is not None and self._built_for == refs:
            return self.model
        if self._base is None:
            raise CladaptError("the arrow router has no model", hint="call bind_model(model, tokenizer) first")
        if self.model is not None:  # remove the previous Arrow layers from the base model
            self._base = self.model.unload()
        paths = [str(self.tasks[r].adapter_dir()) for r in refs]  # type: ignore[misc]
        config = ArrowConfig(top_k=min(self.cfg.experts, len(refs)), router_temperature=self.cfg.temperature,
                             rng_seed=self.cfg.seed)
        try:
            self.model = create_arrow_model(self._base, paths, config).eval()
        except (ValueError, TypeError) as exc:  # PEFT's own compatibility checks
            raise CladaptError(f"PEFT refused to build the Arrow model: {exc}") from exc
        self._built_for = list(refs)
        return self.model

    def route(self, queries: QueryBatch) -> list[Route]:
        self._require_candidates()
        model = self.build()
        refs = self.candidates
        probs = expert_probabilities(model, self._tokenizer, queries.prompts)  # [B, E]
        routes = []
        for row in probs:
            scores = {ref: float(row[i]) for i, ref in enumerate(refs)}
            weights = mix(scores, len(refs))
            routes.append(Route(adapters=weights, scores=scores, combine="arrow",
                                info={"experts_per_token": min(self.cfg.experts, len(refs))}))
        return routes


def _arrow_layers(model: Any) -> list[Any]:
    layers = [m.lora_arrow[ROUTER_ADAPTER] for m in model.modules()
              if hasattr(m, "lora_arrow") and ROUTER_ADAPTER in m.lora_arrow]
    if not layers:
        raise CladaptError("the model has no Arrow layers")
    return layers


@torch.no_grad()
def expert_probabilities(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
    """``[B, E]``: each prompt's Arrow coefficients, averaged over its tokens and the Arrow layers.

    The coefficients are recomputed in a forward hook from PEFT's own prototypes, top-k and
    temperature (the layer does not expose them), for display and scoring only.
    """
    layers = _arrow_layers(model)
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=256,
                            add_special_tokens=False).to(device)
            mask = enc["attention_mask"].float()
            acc: list[torch.Tensor] = []

            def hook(layer: Any, args: tuple[Any, ...], _out: Any, acc: list[torch.Tensor] = acc,
                     mask: torch.Tensor = mask) -> None:
                x = args[0]
                tok = x.reshape(-1, x.shape[-1]).to(layer.prototypes.dtype)
                sim = (tok @ layer.prototypes.T).abs()
                top_v, idx = torch.topk(sim, layer.top_k, dim=1)
                full = torch.full_like(sim, float("-inf")).scatter(1, idx, top_v)
                coeff = torch.softmax(full / layer.temperature, dim=1).reshape(x.shape[0], x.shape[1], -1).float()
                acc.append((coeff * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0))

            handles = [layer.register_forward_hook(hook) for layer in layers]
            try:
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            finally:
                for h in handles:
                    h.remove()
            out.append(torch.stack(acc).mean(0).cpu())
    finally:
        tokenizer.padding_side = old_side
    return torch.cat(out)
