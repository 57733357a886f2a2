"""``cladapt export --vllm``: the registry's active adapters laid out for stock vLLM.

vLLM's contract (serving-and-scale.md §2): an adapter is a PEFT folder whose
``base_model_name_or_path`` must equal the served model's name (its filesystem and Hub resolvers
refuse any other, so a local cache path or a cladapt alias would not load); ``--max-lora-rank``
must be one of a fixed set of sizes and at least every adapter's rank; ``--lora-modules`` takes
``name=path`` or JSON ``{"name", "path", "base_model_name"}``.

The export writes one folder per active version (named by its task, which is what a client
types), ``lora-modules.json``, ``cladapt-export.json`` (which version each folder is) and
``vllm-serve.sh`` with the full command line. The proxy (:mod:`cladapt.serve.proxy`) uses the same
function to hand vLLM one adapter folder at a time.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import CapacityError, CladaptError, NotFound

if TYPE_CHECKING:
    from cladapt.registry.manifest import VersionRecord
    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)

#: the values vLLM accepts for --max-lora-rank
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: the default base model's id on the Hub (what vLLM serves it as)
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class VllmExport:
    out: Path
    base_model: str
    adapters: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    max_lora_rank: int = 8

    @property
    def lora_modules(self) -> list[dict[str, str]]:
        return [{"name": a["name"], "path": a["path"], "base_model_name": self.base_model} for a in self.adapters]

    @property
    def command(self) -> str:
        """The ``vllm serve`` line that serves every exported adapter."""
        mods = " ".join(shlex.quote(json.dumps(m)) for m in self.lora_modules)
        return (f"vllm serve {shlex.quote(self.base_model)} --enable-lora --max-lora-rank {self.max_lora_rank} "
                f"--max-loras {max(1, len(self.adapters))} --lora-modules {mods}")


def hub_id(recorded: str, override: str | None = None) -> str:
    """The base model's id as vLLM serves it; a local folder needs ``override``."""
    if override:
        return override
    if recorded in HUB_IDS:
        return HUB_IDS[recorded]
    if Path(recorded).expanduser().exists() or recorded.startswith((".", "/", "~")):
        raise CladaptError(
            f"the adapters were trained on the local folder {recorded!r}, which vLLM cannot name",
            hint="pass --base-model-id with the model id vLLM serves (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)",
        )
    return recorded


def vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise CapacityError(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})",
                        hint="export fewer adapters in a sum, or serve them with `cladapt serve`")


def write_adapter(store: Store, rec: VersionRecord, folder: Path, base_model: str) -> int:
    """Copy one version's verified PEFT files to ``folder`` with ``base_model_name_or_path`` rewritten."""
    src = store.adapter_dir(f"{rec.task}@{rec.version}")  # checks every file's sha256
    folder.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, folder / f.name)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    ranks = [int(cfg.get("r", rec.r)), *[int(v) for v in (cfg.get("rank_pattern") or {}).values()]]
    return max(ranks)


def export_vllm(store: Store, out: Path, *, base_model_id: str | None = None, refs: list[str] | None = None) -> VllmExport:
    """Write every active version (or ``refs``) on the newest version's base model for vLLM.

    Raises:
        NotFound: nothing to export.
        CladaptError: the base model is a local folder and ``base_model_id`` is missing.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CladaptError(f"{out} exists and is not an empty folder", hint="choose a new folder")
    recs = [store.get(r) for r in refs] if refs else [r for r in store.list() if r.status == "active"]
    if not recs:
        raise NotFound(f"no active adapters in {store.root}", hint="train a task first")
    newest = max(recs, key=lambda r: r.created)
    fingerprint = newest.base_fingerprint
    base = hub_id(str(newest.manifest.base_model["id"]), base_model_id)
    result = VllmExport(out=out, base_model=base)
    out.mkdir(parents=True, exist_ok=True)
    top = 1
    for rec in sorted(recs, key=lambda r: r.task):
        ref = f"{rec.task}@{rec.version}"
        if rec.base_fingerprint != fingerprint:
            result.skipped.append(ref)
            logger.warning("skipping %s: trained on another base model", ref)
            continue
        folder = (out / rec.task).absolute()
        rank = write_adapter(store, rec, folder, base)
        top = max(top, rank)
        result.adapters.append({"name": rec.task, "ref": ref, "path": str(folder), "r": rank, "method": rec.method})
    result.max_lora_rank = vllm_rank(top)
    (out / "lora-modules.json").write_text(json.dumps(result.lora_modules, indent=2))
    (out / "cladapt-export.json").write_text(json.dumps(
        {"base_model": base, "max_lora_rank": result.max_lora_rank, "adapters": result.adapters,
         "skipped": result.skipped}, indent=2))
    (out / "vllm-serve.sh").write_text("#!/bin/sh\n# written by `cladapt export --vllm`\n" + result.command + "\n")
    return result
