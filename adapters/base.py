"""The method-plugin protocol: how a continual-learning method shapes training.

The trainer (``cladapt.train.loop``) calls a method's hooks in a fixed order (methods.md §0.2):

1. ``prepare(model, task, history)`` once, before training: create/initialise the task adapter,
   fold earlier adapters into the frozen base, load sidecars (bases, masks) from ``history``.
2. per micro-batch: ``extra_losses(model, batch, outputs)`` -> named, already weighted terms;
3. per real optimizer step (after accumulation and clipping): ``pre_step`` (gradient transforms),
   then ``optimizer.step()``, then ``post_step`` (parameter re-projection, Adam-safe);
4. ``finalize(model, task)`` once: leave the PEFT adapter "default" in its plain-LoRA export form
   and return the :class:`Sidecars` to persist with the version.

Methods never open the registry: earlier tasks come through the read-only :class:`History`, so
each method is unit-testable with an in-memory fake. Capabilities are class attributes that the
trainer, ``cladapt methods`` and the test matrix read; nothing branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel

Composition = Literal["route", "sum", "single"]

#: The PEFT adapter name a method trains. Exported adapters are saved under this name.
TRAIN_ADAPTER = "default"


class LoraSpec(BaseModel):
    """The LoRA shape shared by every method (methods.md §1 defaults for the 135M model)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=4096, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; scaling = alpha / r")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the LoRA branch input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="module names that get a LoRA"
    )
    target_scope: Literal["language_model", "all"] = Field(
        "language_model",
        description="vision-language bases: LoRA on the language model's modules only, or on every module named "
        "in target_modules (vision tower and projector too); text models ignore it",
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class MethodConfig(BaseModel):
    """Base of every method's typed config. ``extra="forbid"`` turns typos into errors."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="method name in the METHODS table")


@dataclass
class TaskSpec:
    """What a method knows about the task being trained.

    ``dataloader`` yields the tokenized training batches (input_ids, attention_mask, labels) in
    the trainer's collation; methods that need the task's inputs (InfLoRA covariances, prototype
    statistics) iterate it without gradients.
    """

    name: str
    rows: int
    seed: int
    dataloader: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HistoryEntry:
    """One earlier task version, as a method sees it."""

    ref: str  # "amazon@2"
    task: str
    version: int
    method: str
    composition: Composition
    lora: dict[str, Any]  # r, alpha, dropout, target_modules
    created: str


class History(Protocol):
    """Read-only view of earlier task versions on the same base model, oldest first."""

    def versions(self) -> Sequence[HistoryEntry]:
        """The active version of every *other* task, oldest first."""
        ...

    def latest(self, method: str) -> HistoryEntry | None:
        """The newest active version trained with ``method``, of any task (the current one too)."""
        ...

    def adapter_config(self, ref: str) -> dict[str, Any]: ...

    def adapter_state(self, ref: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed ``<module path>.lora_A.weight`` / ``.lora_B.weight``
        (module path as in the base model, e.g. ``model.layers.0.self_attn.q_proj``)."""
        ...

    def sidecar_tensors(self, ref: str, name: str) -> dict[str, torch.Tensor]: ...

    def sidecar_json(self, ref: str, name: str) -> dict[str, Any]: ...


@dataclass
class Sidecars:
    """Continual-learning state a method persists with its version (safetensors + JSON only)."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # file stem -> tensors
    json: dict[str, dict[str, Any]] = field(default_factory=dict)  # file stem -> JSON object
    metrics: dict[str, Any] = field(default_factory=dict)  # numbers for the manifest

    def merge(self, other: Sidecars) -> None:
        for kind, mine, theirs in (("tensor", self.tensors, other.tensors), ("json", self.json, other.json)):
            clash = set(mine) & set(theirs)
            if clash:
                raise ValueError(f"two plugins write the same {kind} sidecar(s): {sorted(clash)}")
            mine.update(theirs)
        self.metrics.update(other.metrics)


class TrainingPlugin:
    """A participant in training. Every default does nothing; override only what is needed.

    Subclasses may not define public methods that look like hooks but are not part of the
    protocol (``pre_*``, ``post_*``, ``extra_*``, ``on_*``): a misspelt hook would never run.
    """

    name: ClassVar[str] = ""
    _HOOKS: ClassVar[frozenset[str]] = frozenset({"prepare", "extra_losses", "pre_step", "post_step", "finalize"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr in vars(cls):
            if attr.startswith(("pre_", "post_", "extra_", "on_")) and attr not in cls._HOOKS:
                raise TypeError(f"{cls.__name__}.{attr} looks like a hook but is not one; hooks: {sorted(cls._HOOKS)}")

    def prepare(self, model: PeftModel, task: TaskSpec, history: History) -> None:
        """Set up before the first step."""

    def extra_losses(self, model: PeftModel, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        """Named, already weighted loss terms added to the task loss."""
        return {}

    def pre_step(self, model: PeftModel) -> None:
        """Gradient transforms; gradients are accumulated and clipped already."""

    def post_step(self, model: PeftModel) -> None:
        """Parameter updates after ``optimizer.step()`` (re-projection, merges)."""

    def finalize(self, model: PeftModel, task: TaskSpec) -> Sidecars:
        """State to persist with the version."""
        return Sidecars()


class CLMethod(TrainingPlugin):
    """A continual-learning method: owns the task's adapter and its composition rule.

    Class attributes are capabilities read by the trainer, the CLI and the test matrix.
    """

    summary: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    composition: ClassVar[Composition] = "route"
    #: earlier adapters are never modified (the matrix checks they stay byte-identical)
    freezes_history: ClassVar[bool] = True
    #: the method needs whole parameter matrices, so it cannot run sharded under ZeRO-3
    supports_zero3: ClassVar[bool] = False
    #: the method is trained by ``cladapt forget`` rather than ``cladapt train``
    forgetting: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, lora: LoraSpec) -> None:
        self.config = config
        self.lora = lora

    def lora_config(self, base_model_id: str) -> LoraConfig:
        """The PEFT config of the adapter this method trains (and exports)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora.r,
            lora_alpha=self.lora.alpha,
            lora_dropout=self.lora.dropout,
            target_modules=list(self.lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_id,
        )

    def summed_history(self, history: History) -> list[HistoryEntry]:
        """Earlier versions that are active (summed) while this task trains and at inference.

        The trainer folds them exactly into the frozen base weights for training
        (``adapters.compose.folded``), so step cost does not grow with the number of tasks.
        """
        if self.composition != "sum":
            return []
        return [e for e in history.versions() if e.composition == "sum"]

    def parents(self, history: History) -> list[str]:
        """Refs this version depends on (lineage). Default: the summed earlier versions."""
        return [e.ref for e in self.summed_history(history)]
