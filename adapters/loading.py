"""Put registry adapters onto a base model for inference, evaluation and export.

Three ways to apply adapters, matching the methods' composition rules:

* one version (``amazon@3``): PEFT loads its folder unchanged;
* ``sum``: every active sum-composed version on this base, rank-concatenated into one plain
  LoRA (methods.md §10) so one PEFT adapter serves them all at once;
* ``single`` methods (``seq-lora``) are one adapter continued across tasks: its newest version.

Every adapter's recorded base fingerprint is checked against the loaded base before use.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from cladapt.adapters.compose import concat_config, factors, rank_concat
from cladapt.base_model import DEFAULT_BASE_MODEL, BaseModelInfo, check_compatible
from cladapt.errors import NotFound, UsageError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from cladapt.registry.store import Store, VersionRecord

logger = logging.getLogger(__name__)

SUM_ADAPTER = "composed_sum"


def summed_versions(store: Store, base: BaseModelInfo) -> list[VersionRecord]:
    """Active sum-composed versions trained on ``base``, oldest first."""
    recs = [
        r
        for r in store.list()
        if r.status == "active" and r.composition == "sum" and r.manifest.base_model.get("fingerprint") == base.fingerprint
    ]
    return sorted(recs, key=lambda r: (r.created, r.task, r.version))


def _read_adapter(store: Store, rec: VersionRecord) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = store.adapter_dir(f"{rec.task}@{rec.version}")
    return load_file(str(folder / "adapter_model.safetensors")), json.loads((folder / "adapter_config.json").read_text())


def write_merged(store: Store, recs: list[VersionRecord], out_dir: Path, base_id: str) -> dict[str, int]:
    """Write the rank-concatenation of ``recs`` as one plain PEFT adapter folder."""
    if not recs:
        raise NotFound("no adapters to merge", hint="train a sum-composed method first (olora, inc-lora, ...)")
    parts = []
    scopes = set()
    for rec in recs:
        state, cfg = _read_adapter(store, rec)
        parts.append(factors(state, cfg))
        scopes.add(json.dumps(cfg.get("target_modules"), sort_keys=True))
    state, ranks = rank_concat(parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = concat_config(ranks, base_id)
    cfg["peft_type"] = "LORA"
    cfg["target_modules"] = sorted(cfg["target_modules"])
    scope = json.loads(scopes.pop()) if len(scopes) == 1 else None
    if isinstance(scope, str):  # a regex (vision-language bases: the language model only) stays exact
        cfg["target_modules"] = scope
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=list))
    return ranks


def attach(
    model: PreTrainedModel, store: Store, base: BaseModelInfo, refs: list[str], *, scratch: Path | None = None
) -> tuple[PeftModel, list[str]]:
    """Load registry versions as PEFT adapters named ``<task>__v<N>``; returns (model, names)."""
    from peft import PeftModel

    names: list[str] = []
    peft_model: Any = model
    for ref in refs:
        rec = store.get(ref)
        check_compatible(rec.manifest.base_model, base, what=f"adapter {rec.task}@{rec.version}")
        name = f"{rec.task}__v{rec.version}"
        folder = store.adapter_dir(f"{rec.task}@{rec.version}")
        if isinstance(peft_model, PeftModel):
            peft_model.load_adapter(str(folder), adapter_name=name)
        else:
            peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
        names.append(name)
    if not names:
        raise NotFound("no adapter to load")
    peft_model.eval()
    return peft_model, names


def attach_sum(model: PreTrainedModel, store: Store, base: BaseModelInfo, scratch: Path) -> tuple[PeftModel, list[str]]:
    """All active sum-composed versions as one concatenated adapter; returns (model, refs used)."""
    from peft import PeftModel

    recs = summed_versions(store, base)
    if not recs:
        raise NotFound(
            "no active sum-composed adapters on this base model",
            hint="train with a sum-composed method (inc-lora, olora, owlora, reglora, inflora)",
        )
    write_merged(store, recs, scratch, base.id)
    peft_model = PeftModel.from_pretrained(model, str(scratch), adapter_name=SUM_ADAPTER)
    peft_model.eval()
    return peft_model, [f"{r.task}@{r.version}" for r in recs]


@dataclass(frozen=True)
class Applied:
    """What is applied on the base: recorded with a score (``plan``) and shown to the user."""

    composition: str  # "base", "adapter" (one or more versions, by ref) or "sum"
    refs: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"composition": self.composition, "refs": list(self.refs)}

    @property
    def label(self) -> str:
        if self.composition == "sum":
            return f"sum of {', '.join(self.refs)}"
        return ", ".join(self.refs) or "base model"


def choose_base_model(
    store: Store | None, *, adapters: Sequence[str] = (), compose: str | None = None, override: str | None = None
) -> str:
    """The base a command loads to apply adapters: the one they were trained on, unless told otherwise.

    ``override`` (``--base-model``) wins; else the base of the first of ``adapters``; else, for
    ``compose="sum"``, that of the newest active sum-composed version; else, with a registry, that
    of its newest version (talking to the base a registry's adapters belong to); else the default.
    A mismatch with an adapter's recorded fingerprint is refused later, when it is attached.
    """
    if override:
        return override
    if store is None:
        return DEFAULT_BASE_MODEL
    if adapters:
        return str(store.get(adapters[0]).manifest.base_model.get("id") or DEFAULT_BASE_MODEL)
    records = store.list()
    if compose == "sum":
        records = [r for r in records if r.status == "active" and r.composition == "sum"]
    newest = max(records, key=lambda r: r.created, default=None)
    return str(newest.manifest.base_model.get("id") or DEFAULT_BASE_MODEL) if newest else DEFAULT_BASE_MODEL


@contextmanager
def load_with_adapters(
    store: Store | None,
    *,
    adapters: Sequence[str] = (),
    compose: str | None = None,
    base_model: str | None = None,
    device: str | None = None,
) -> Iterator[tuple[Any, Any, BaseModelInfo, Applied]]:
    """Load the base the adapters belong to (:func:`choose_base_model`) and apply them.

    One entry point for every command that runs a model with registry adapters (``generate``,
    ``eval``): ``adapters`` (one or more versions, all active at once), ``compose="sum"`` (every
    active sum-composed version as one LoRA, written to a scratch folder removed on exit), or
    neither (the base alone).

    Yields:
        (model, tokenizer, base info, what was applied).

    Raises:
        UsageError: both ``adapters`` and ``compose``, or adapters without a registry.
        NotFound, IncompatibleBaseModel: an unknown version, or one trained on another base.
    """
    from cladapt.base_model import load

    if adapters and compose:
        raise UsageError("apply --adapter or --compose, not both")
    if (adapters or compose) and store is None:
        raise UsageError("adapters come from a registry: pass --registry")
    model, tokenizer, info = load(choose_base_model(store, adapters=adapters, compose=compose, override=base_model),
                                  device=device)
    with tempfile.TemporaryDirectory(prefix="cladapt-sum-") as scratch:
        applied = Applied("base", [])
        if adapters and store is not None:
            refs = [str(store.get(ref).ref) for ref in adapters]
            model, names = attach(model, store, info, refs)
            if len(names) > 1:
                model.base_model.set_adapter(names)
            applied = Applied("adapter", refs)
        elif compose == "sum" and store is not None:
            model, used = attach_sum(model, store, info, Path(scratch) / "sum")
            applied = Applied("sum", used)
        yield model, tokenizer, info, applied
