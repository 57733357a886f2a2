"""Which registry versions a router chooses among, and their signatures.

Candidates are the *active* version of every task trained on the loaded base model whose
composition is routable: ``route`` methods (one LoRA per task, ``lora``) by default, and, when
asked, the versions of the sum-composed sequence (then a route picks one of those versions
instead of summing them all). ``single`` methods continue one adapter and are never routed.

A signature is read from the version itself (``sidecars/signature.*``, written at commit) or,
for versions trained before signatures existed, from ``shared/signatures/<task>-v<N>/``
(``cladapt route index``). Both are hash-verified on read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cladapt.errors import CladaptError, IntegrityError
from cladapt.features import SIGNATURE_KIND, SIGNATURE_STEM, Signature, signature_key
from cladapt.serve.routers.base import TaskView

if TYPE_CHECKING:
    from cladapt.registry.manifest import VersionRecord
    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)

ROUTABLE = ("route", "sum")


def read_signature(store: Store, rec: VersionRecord) -> Signature | None:
    """The version's signature (its own sidecar first, then an indexed one), or None."""
    from safetensors.torch import load_file

    ref = f"{rec.task}@{rec.version}"
    if rec.manifest.file(f"sidecars/{SIGNATURE_STEM}.safetensors") is not None:
        tensors = store.read_tensors(ref, f"sidecars/{SIGNATURE_STEM}.safetensors")
        meta = store.read_json(ref, f"sidecars/{SIGNATURE_STEM}.json")
        return Signature.from_parts(tensors, meta, f"{ref} sidecars/{SIGNATURE_STEM}")
    folder = store.read_shared(SIGNATURE_KIND, signature_key(rec.task, rec.version))
    if folder is None:
        return None
    where = f"{folder}"
    try:
        meta = json.loads((folder / f"{SIGNATURE_STEM}.json").read_text())
        tensors = load_file(str(folder / f"{SIGNATURE_STEM}.safetensors"))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{where}: unreadable signature ({exc})", hint="rebuild it with `cladapt route index`") from exc
    return Signature.from_parts(tensors, meta, where)


def candidate_records(store: Store, base_fingerprint: str, *, compositions: Sequence[str] = ("route",),
                      tasks: Sequence[str] | None = None) -> list[VersionRecord]:
    """Active versions on this base whose composition is in ``compositions`` (and task in ``tasks``), oldest first."""
    bad = [c for c in compositions if c not in ROUTABLE]
    if bad:
        raise CladaptError(f"cannot route among {bad} versions", hint=f"routable compositions: {', '.join(ROUTABLE)}")
    recs = [r for r in store.list() if r.status == "active" and r.composition in compositions
            and r.base_fingerprint == base_fingerprint and (tasks is None or r.task in tasks)]
    return sorted(recs, key=lambda r: (r.created, r.task, r.version))


def task_view(store: Store, rec: VersionRecord, *, with_signature: bool = True) -> TaskView:
    """A router's view of one version (the adapter folder is verified only when read)."""
    ref = f"{rec.task}@{rec.version}"
    return TaskView(
        ref=ref,
        task=rec.task,
        version=rec.version,
        peft_name=rec.peft_name,
        composition=rec.composition,
        lora=dict(rec.manifest.lora),
        signature=read_signature(store, rec) if with_signature else None,
        adapter_dir=lambda: store.adapter_dir(ref),
    )


def task_views(store: Store, base_fingerprint: str, *, compositions: Sequence[str] = ("route",),
               with_signatures: bool = True, tasks: Sequence[str] | None = None) -> list[TaskView]:
    """Views of every candidate (of ``tasks`` only, when given); a clear error when there is none."""
    recs = candidate_records(store, base_fingerprint, compositions=compositions, tasks=tasks)
    if not recs:
        raise CladaptError(
            f"no active {' or '.join(compositions)}-composed versions on this base model in {store.root}",
            hint="train tasks with a routed method (--method lora), or pass --compositions sum",
        )
    return [task_view(store, r, with_signature=with_signatures) for r in recs]
