"""Export registry versions as plain PEFT adapter folders (the library side of ``cladapt export``).

Two shapes, both loadable by ``PeftModel.from_pretrained`` and by vLLM:

* one version: its stored folder, copied byte for byte;
* merged: every active sum-composed version on the newest version's base model, rank-concatenated
  into one LoRA whose delta is exactly their sum (methods.md §10); versions on another base are
  left out and listed in ``ExportResult.skipped``.

The destination must be new or empty, so an export never mixes its files with older ones.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cladapt.adapters.loading import summed_versions, write_merged
from cladapt.base_model import BaseModelInfo
from cladapt.errors import NotFound, UsageError

if TYPE_CHECKING:
    from cladapt.registry.store import Store


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the refs it contains and the resulting LoRA rank; ``skipped``: the
    active sum-composed versions a merged export left out because they were trained on another
    base model than the newest version's (an adapter only applies to its own base)."""

    out: Path
    refs: list[str]
    rank: int
    skipped: list[str] = field(default_factory=list)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder", hint="choose a new folder")


def export_version(store: Store, ref: str, out: Path) -> ExportResult:
    """Copy one version's adapter folder (``task``, ``task@N``) to ``out``."""
    _check_out(out)
    rec = store.get(ref)
    full = f"{rec.task}@{rec.version}"
    src = store.adapter_dir(full)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        shutil.copy2(f, out / f.name)
    return ExportResult(out, [full], int(rec.manifest.lora["r"]))


def export_merged(store: Store, out: Path) -> ExportResult:
    """Write every active sum-composed version (on the newest version's base) as one LoRA."""
    _check_out(out)
    recs = store.list()
    if not recs:
        raise NotFound("the registry is empty", hint="train a task first")
    newest = max(recs, key=lambda r: r.created)
    bm = newest.manifest.base_model
    info = BaseModelInfo(bm["id"], Path("."), bm["fingerprint"], bm.get("tokenizer_fingerprint", ""))
    chosen = summed_versions(store, info)
    ranks = write_merged(store, chosen, out, bm["id"])
    refs = [f"{r.task}@{r.version}" for r in chosen]
    skipped = [f"{r.task}@{r.version}" for r in recs
               if r.status == "active" and r.composition == "sum" and f"{r.task}@{r.version}" not in refs]
    return ExportResult(out, refs, max(ranks.values()), skipped)
