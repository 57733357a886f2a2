"""``gslora``: GS-LoRA / GS-LoRA++, practical continual forgetting (Zhao et al., CVPR 2024 / T-PAMI;
methods.md §8). Trained by ``cladapt forget`` (``forgetting = True``), never by ``cladapt train``.

Paper: "Continual Forgetting for Pre-trained Vision Models" (GS-LoRA) and its prototype extension.
A forgetting request (a forget set F and a retain set R) becomes one more LoRA in the active sum,
trained to raise the loss on F up to a bound while keeping R, with a group lasso that leaves only
a few layers edited.

Loss per step (retain batch = the trainer's task batch; forget batch = the plugin's own paired
batch, one extra forward)::

    L = CE(R) + beta * relu(BND - CE(F))                               # "forget", bounded ascent
        + alpha * sum_g sqrt(sum_{P in g} ||P||_F^2 + 1e-12)           # "group", group lasso (L2,1)
        + w_f * relu(BND_pro - KL_F) + w_r * KL_R                      # "proto_f"/"proto_r" (GS-LoRA++)
    KL_X = KL(softmax(proto[y]) || softmax(feature(x))) over the feature dimension

Groups: one per decoder layer (all LoRA tensors under ``...layers.<i>``; ``groups: module`` gives one
per module). Features: last-layer hidden state at the last prompt token; ``proto[c]`` = mean feature
of class ``c`` (its label, else its answer text) under the model *before* this forgetting task.

Persists: the forgetting adapter with every group whose norm is ``< tau_g * max`` set to exactly
zero; ``gslora.json`` (BND, alpha, beta, group norms, kept/pruned groups, forget/retain CE and
accuracy before/after, the harmonic mean H of methods.md §11.4); ``gslora_protos.safetensors``
(``proto`` f32 ``[C, d]``) with GS-LoRA++.

Deviations: [cladapt] ``BND = ln(vocab_size)`` (chance-level CE) instead of the face-recognition
105; pruned groups are zeroed, not removed, so the export keeps one PEFT shape (their delta is
exactly 0). Accuracies are teacher-forced: ``token_acc`` (argmax = answer token) and ``seq_acc``
(every answer token right, i.e. greedy decoding reproduces the answer). PEFT's default ``A`` init
is kept (the official one uses Kaiming with ``a = sqrt(50)``). No weight EMA, no alpha warm-up.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from typing_extensions import override

from cladapt.adapters.base import CLMethod, Composition, History, MethodConfig, Sidecars, TaskSpec
from cladapt.adapters.linalg import group_norms
from cladapt.adapters.lora_layers import check_sum_capacity, factor_params, lora_layers
from cladapt.errors import CladaptError
from cladapt.vision import forward_inputs

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


class GSLoRAConfig(MethodConfig):
    name: str = Field("gslora", description="method name")
    beta: float = Field(0.2, ge=0, description="weight of the bounded forgetting loss relu(BND - CE_forget)")
    alpha: float = Field(1e-4, ge=0, description="weight of the group lasso over LoRA groups")
    bnd: float | None = Field(None, gt=0, description="forget-CE bound BND (None: ln(vocab_size), chance level)")
    groups: Literal["layer", "module"] = Field("layer", description="group-lasso groups: per decoder layer or module")
    tau_g: float = Field(1e-3, ge=0, lt=1, description="prune groups with norm < tau_g * max group norm")
    prototypes: bool = Field(False, description="GS-LoRA++: add the prototype KL losses")
    bnd_pro: float = Field(18.0, gt=0, description="GS-LoRA++ bound on the forget-prototype KL")
    w_f: float = Field(0.01, ge=0, description="GS-LoRA++ weight of relu(BND_pro - KL_forget)")
    w_r: float = Field(0.0, ge=0, description="GS-LoRA++ weight of KL_retain")
    eval_batches: int = Field(8, ge=1, description="batches of each set scored before/after (CE, accuracy)")


def group_of(path: str, how: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3`` (``layer``) or itself (``module``)."""
    if how == "module":
        return path
    m = _LAYER.match(path)
    return m.group(1) if m else path


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Index of the last prompt token of each row (the position predicting the first answer token)."""
    has = labels != IGNORE_INDEX
    first = has.float().argmax(dim=1)
    return (first - 1).clamp_min(0)


def answer_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Teacher-forced answer-token CE (mean), token accuracy and whole-answer accuracy."""
    lg, lb = logits[:, :-1, :].float(), labels[:, 1:]
    ce = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=IGNORE_INDEX)
    valid = lb != IGNORE_INDEX
    hit = (lg.argmax(-1) == lb) & valid
    return {
        "ce": ce,
        "tokens": valid.sum(),
        "token_hits": hit.sum(),
        "rows": (valid.any(1)).sum(),
        "row_hits": ((hit | ~valid).all(1) & valid.any(1)).sum(),
    }


def kl_to_protos(protos: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(proto) || softmax(feature))`` over the feature dimension."""
    p_log = F.log_softmax(protos.float(), dim=-1)
    q_log = F.log_softmax(feats.float(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def harmonic(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], acc: str) -> float:
    """methods.md §11.4: ``H = 2 drop_f Acc_r / (drop_f + Acc_r)``, ``drop_f`` = forget accuracy lost."""
    drop_f = before["forget"][acc] - after["forget"][acc]
    acc_r = after["retain"][acc]
    return 2 * drop_f * acc_r / (drop_f + acc_r) if drop_f + acc_r > 0 else 0.0


class GSLoRA(CLMethod):
    name: ClassVar[str] = "gslora"
    summary: ClassVar[str] = "forgetting adapter: bounded forget loss + group lasso (+ prototypes); summed"
    Config = GSLoRAConfig
    composition: ClassVar[Composition] = "sum"
    forgetting: ClassVar[bool] = True
    config: GSLoRAConfig

    def __init__(self, config: GSLoRAConfig, lora: Any) -> None:
        super().__init__(config, lora)
        self.needs_hidden_states = config.prototypes  # the trainer reads this capability
        self._layers: dict[str, Any] = {}
        self._groups: dict[str, list[str]] = {}
        self.bnd = 0.0
        self._forget_loader: Any = None
        self._forget_iter: Iterator[dict[str, Any]] | None = None
        self._eval: dict[str, list[dict[str, Any]]] = {}  # fixed batches scored before and after
        self.before: dict[str, dict[str, float]] = {}
        self.protos: torch.Tensor | None = None
        self._classes: dict[str, list[int]] = {}  # "forget"/"retain" -> class index per row_index
        self.class_names: list[str] = []

    # -- prepare ------------------------------------------------------------------------------

    @override
    def prepare(self, model: PeftModel, task: TaskSpec, history: History) -> None:
        check_sum_capacity(model, history, self.summed_history(history), self.name)
        self._forget_loader = task.extra.get("forget_loader")
        if self._forget_loader is None:
            raise CladaptError(
                f"{self.name} needs a forget set", hint="train it with `cladapt forget --forget F.jsonl`"
            )
        self._layers = lora_layers(model)
        self._groups = {}
        for path in self._layers:
            self._groups.setdefault(group_of(path, self.config.groups), []).append(path)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.bnd = self.config.bnd if self.config.bnd is not None else math.log(vocab)
        # the same batches before and after (the forget loader reshuffles at every pass)
        n = self.config.eval_batches
        self._eval = {
            "forget": list(itertools.islice(self._forget_loader, n)),
            "retain": list(itertools.islice(task.dataloader, n)),
        }
        self.before = {k: self.score(model, v) for k, v in self._eval.items()}
        if self.config.prototypes:
            self._build_prototypes(model, task)
        logger.info("gslora: BND %.3f, %d groups; before: %s", self.bnd, len(self._groups), self.before)

    def _next_forget(self) -> dict[str, Any]:
        if self._forget_iter is None:
            self._forget_iter = iter(self._forget_loader)
        try:
            return next(self._forget_iter)
        except StopIteration:  # a new epoch over the forget set (reshuffled by its loader)
            self._forget_iter = iter(self._forget_loader)
            return next(self._forget_iter)

    @torch.no_grad()
    def score(self, model: PeftModel, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Teacher-forced CE / token accuracy / answer accuracy over the first ``eval_batches`` batches."""
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        tot = {"ce_sum": 0.0, "tokens": 0, "token_hits": 0, "rows": 0, "row_hits": 0}
        try:
            for batch in itertools.islice(loader, self.config.eval_batches):
                out = model(**forward_inputs(batch, dev))
                s = answer_stats(out.logits, batch["labels"].to(dev))
                if int(s["tokens"]) == 0:
                    continue
                tot["ce_sum"] += float(s["ce"]) * int(s["tokens"])
                for k in ("tokens", "token_hits", "rows", "row_hits"):
                    tot[k] += int(s[k])
        finally:
            model.train(was)
        n = max(1, tot["tokens"])
        return {
            "ce": tot["ce_sum"] / n,
            "token_acc": tot["token_hits"] / n,
            "seq_acc": tot["row_hits"] / max(1, tot["rows"]),
            "rows": tot["rows"],
        }

    # -- prototypes (GS-LoRA++) ------------------------------------------------------------------

    def _features(self, model: PeftModel, batch: dict[str, Any], hidden: torch.Tensor | None = None) -> torch.Tensor:
        dev = next(model.parameters()).device
        if hidden is None:
            out = model(
                **forward_inputs(batch, dev),
                output_hidden_states=True,
            )
            hidden = out.hidden_states[-1]
        pos = answer_positions(batch["labels"].to(hidden.device))
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos].float()

    @torch.no_grad()
    def _build_prototypes(self, model: PeftModel, task: TaskSpec) -> None:
        names = {"forget": task.extra.get("forget_classes"), "retain": task.extra.get("retain_classes")}
        if names["forget"] is None or names["retain"] is None:
            raise CladaptError("gslora prototypes need class names of the forget and retain rows")
        self.class_names = sorted(set(names["forget"]) | set(names["retain"]))
        index = {c: i for i, c in enumerate(self.class_names)}
        self._classes = {k: [index[c] for c in v] for k, v in names.items()}
        d = model.get_output_embeddings().weight.shape[1]
        sums, counts = torch.zeros(len(self.class_names), d), torch.zeros(len(self.class_names))
        was = model.training
        model.eval()
        try:
            for kind, loader in (("forget", self._forget_loader), ("retain", task.dataloader)):
                for batch in loader:
                    feats = self._features(model, batch).cpu()
                    cls = torch.tensor([self._classes[kind][int(i)] for i in batch["row_index"]])
                    sums.index_add_(0, cls, feats)
                    counts.index_add_(0, cls, torch.ones(len(cls)))
        finally:
            model.train(was)
        self.protos = sums / counts.clamp_min(1)[:, None]

    def _proto_kl(self, kind: str, batch: dict[str, Any], feats: torch.Tensor) -> torch.Tensor:
        assert self.protos is not None
        cls = torch.tensor([self._classes[kind][int(i)] for i in batch["row_index"]])
        return kl_to_protos(self.protos[cls].to(feats.device), feats)

    # -- training hooks --------------------------------------------------------------------------

    def group_lasso(self) -> torch.Tensor:
        norms = group_norms(
            {g: [t for p in ps for t in factor_params(self._layers[p])] for g, ps in self._groups.items()}
        )
        return torch.stack(list(norms.values())).sum()

    @override
    def extra_losses(self, model: PeftModel, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        fb = self._next_forget()
        dev = next(model.parameters()).device
        out_f = model(
            **forward_inputs(fb, dev),
            output_hidden_states=self.config.prototypes,
            use_cache=False,
        )
        ce_f = answer_stats(out_f.logits, fb["labels"].to(dev))["ce"]
        terms = {
            "forget": self.config.beta * F.relu(self.bnd - ce_f),
            "group": self.config.alpha * self.group_lasso(),
        }
        if self.config.prototypes:
            feats_f = self._features(model, fb, out_f.hidden_states[-1])
            terms["proto_f"] = self.config.w_f * F.relu(self.config.bnd_pro - self._proto_kl("forget", fb, feats_f))
            if self.config.w_r and getattr(outputs, "hidden_states", None) is not None:
                own = (
                    batch["sample_kind"] == 0
                    if "sample_kind" in batch
                    else torch.ones_like(batch["row_index"], dtype=torch.bool)
                )
                if bool(own.any()):  # only the retain rows themselves have prototypes (not replay rows)
                    rows = {k: batch[k][own] for k in ("labels", "row_index")}
                    feats_r = self._features(
                        model, rows, outputs.hidden_states[-1][own.to(outputs.hidden_states[-1].device)]
                    )
                    terms["proto_r"] = self.config.w_r * self._proto_kl("retain", rows, feats_r)
        return terms

    # -- finalize --------------------------------------------------------------------------------

    @torch.no_grad()
    def prune(self) -> tuple[dict[str, float], list[str]]:
        """Zero every group with norm ``< tau_g * max``; returns (norms before pruning, pruned groups)."""
        norms = {
            g: float(v)
            for g, v in group_norms(
                {g: [t for p in ps for t in factor_params(self._layers[p])] for g, ps in self._groups.items()}, eps=0.0
            ).items()
        }
        top = max(norms.values(), default=0.0)
        pruned = [g for g, v in norms.items() if v < self.config.tau_g * top or top == 0.0]
        for g in pruned:
            for p in self._groups[g]:
                for t in factor_params(self._layers[p]):
                    t.zero_()
        return norms, pruned

    @override
    def finalize(self, model: PeftModel, task: TaskSpec) -> Sidecars:
        norms, pruned = self.prune()
        after = {k: self.score(model, v) for k, v in self._eval.items()}
        h = harmonic(self.before, after, "seq_acc")
        summary = {
            "bnd": self.bnd,
            "alpha": self.config.alpha,
            "beta": self.config.beta,
            "tau_g": self.config.tau_g,
            "groups": self.config.groups,
            "group_norms": norms,
            "kept": sorted(set(norms) - set(pruned)),
            "pruned": sorted(pruned),
            "before": self.before,
            "after": after,
            "H": h,
            "H_token": harmonic(self.before, after, "token_acc"),
            "prototypes": self.config.prototypes,
        }
        side = Sidecars(
            json={"gslora": summary}, metrics={"gslora_H": h, "gslora_groups_kept": len(norms) - len(pruned)}
        )
        if self.protos is not None:
            side.tensors["gslora_protos"] = {"proto": self.protos.float().contiguous()}
            summary["classes"] = self.class_names
        return side
