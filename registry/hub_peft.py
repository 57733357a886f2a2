"""Import any PEFT LoRA repo from the Hub as a new version of a task.

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are fetched (a repo with only
``adapter_model.bin`` is refused: it is a pickle). The adapter must be a plain LoRA, its
``base_model_name_or_path`` must be the Hub id of the base model the registry will use it with,
and every LoRA matrix must fit a module of that base model (checked on a weightless copy), so a
mismatch is refused here rather than failing or producing garbage at load time.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import IncompatibleBaseModel, IntegrityError, RegistryError
from cladapt.registry.fsio import sha256_file
from cladapt.registry.hub_client import download
from cladapt.registry.hub_layout import check_repo_path, hub_base_id
from cladapt.registry.refs import validate_task_name

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from cladapt.registry.store import Store

logger = logging.getLogger(__name__)
#: LoRA variants cladapt cannot compose, route or serve as a plain LoRA.
_UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save (full copies of modules)",
                "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication"}


def _check_config(config: dict[str, Any], where: str) -> None:
    if config.get("peft_type") != "LORA":
        raise RegistryError(f"{where}: is a {config.get('peft_type')!r} adapter, not a LoRA", hint="only PEFT LoRA adapters can be imported")
    used = [label for key, label in _UNSUPPORTED.items() if config.get(key)]
    if used:
        raise RegistryError(f"{where}: uses {', '.join(used)}, which cladapt does not support", hint="import a plain LoRA")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise RegistryError(f"{where}: task_type is {config.get('task_type')!r}, cladapt adapts causal LMs (CAUSAL_LM)")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise RegistryError(f"{where}: r must be a positive integer, got {r!r}")


def check_shapes(weights: Path, base_path: Path, where: str) -> None:
    """Every ``lora_A``/``lora_B`` matrix must match a Linear module of the base model."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    problems: list[str] = []
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
        for key in keys:
            shape = tuple(handle.get_slice(key).get_shape())
            module_name, sep, part = key.removeprefix("base_model.model.").partition(".lora_")
            if not sep or part not in ("A.weight", "B.weight"):
                problems.append(f"{key}: not a LoRA matrix")
                continue
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                problems.append(f"{key}: the base model has no module {module_name!r}")
                continue
            if not isinstance(module, torch.nn.Linear):
                problems.append(f"{key}: {module_name} is a {type(module).__name__}, not a Linear layer")
                continue
            want = module.in_features if part == "A.weight" else module.out_features
            got = shape[1] if part == "A.weight" else shape[0]
            if len(shape) != 2 or got != want:
                problems.append(f"{key}: shape {list(shape)} does not fit {module_name} ({module.in_features}->{module.out_features})")
    if not keys:
        problems.append("no tensors")
    if problems:
        raise IncompatibleBaseModel(f"{where}: the adapter does not fit the base model:\n  - " + "\n  - ".join(problems[:20]),
                                    hint="pull it with the base model it was trained for (--base-model)")


def import_peft(store: Store, api: HfApi, repo_id: str, commit: str, tree: dict[str, tuple[str, str | None, int]], work: Path,
                *, task: str, subfolder: str | None, base_model: str | None, base_model_id: str | None) -> dict[str, Any]:
    """Fetch, check and commit one PEFT LoRA repo as the next version of ``task``."""
    from cladapt.base_model import DEFAULT_BASE_MODEL, fingerprint_folder, resolve_path

    validate_task_name(task)  # before anything is downloaded
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    where = f"{repo_id}{'/' + prefix.rstrip('/') if prefix else ''}@{commit[:12]}"
    config_path, weights_path = f"{prefix}adapter_config.json", f"{prefix}adapter_model.safetensors"
    for path in (config_path, weights_path):
        if (why := check_repo_path(path)) is not None:
            raise RegistryError(f"{where}: {why}")
    if config_path not in tree:
        raise RegistryError(f"{where}: no adapter_config.json and no cladapt-hub.json: neither a PEFT adapter nor a cladapt repo",
                            hint="pass --subfolder if the adapter sits in a folder of the repo")
    if weights_path not in tree:
        pickled = f"{prefix}adapter_model.bin" in tree
        raise IntegrityError(f"{where}: no adapter_model.safetensors" + (" (only adapter_model.bin, a pickle)" if pickled else ""),
                             hint="cladapt never loads pickles; ask the author for safetensors weights" if pickled else None)
    root = download(api, repo_id, commit, [config_path, weights_path], work / "repo")
    config_bytes = (root / config_path).read_bytes()
    try:
        config = json.loads(config_bytes)
    except ValueError as exc:
        raise IntegrityError(f"{where}: adapter_config.json is not valid JSON ({exc})") from exc
    _check_config(config, where)
    base_name = base_model or DEFAULT_BASE_MODEL
    base_id = hub_base_id(base_name, base_model_id, what=f"the base model {base_name!r}")
    declared = config.get("base_model_name_or_path")
    if declared != base_id:
        raise IncompatibleBaseModel(f"{where}: the adapter was made for {declared!r}, not for {base_id!r}",
                                    hint="pull it with that base model (--base-model, and --base-model-id for a local folder)")
    base_path = Path(resolve_path(base_name))
    check_shapes(root / weights_path, base_path, where)
    weights_sha, _ = sha256_file(root / weights_path)
    if task in store.tasks():
        for rec in store.list(task):
            entry = rec.manifest.file("adapter/adapter_model.safetensors")
            if entry is not None and entry.sha256 == weights_sha:
                return {"remote": where, "local": str(rec.ref), "action": "present", "reason": "same weights already in the registry"}
    fingerprint, tok_fingerprint = fingerprint_folder(base_path)
    has_active = task in store.tasks() and store.active(task) is not None
    status = "candidate" if has_active else "active"
    with store.stage(task) as staging:
        shutil.copyfile(root / config_path, staging.adapter_dir / "adapter_config.json")
        shutil.copyfile(root / weights_path, staging.adapter_dir / "adapter_model.safetensors")
        staging.manifest_fields = {
            "method": "lora", "method_config": {"name": "lora"}, "composition": "route",
            "base_model": {"id": base_name, "fingerprint": fingerprint, "tokenizer_fingerprint": tok_fingerprint},
            "lora": {"r": config["r"], "alpha": config.get("lora_alpha", config["r"]), "dropout": config.get("lora_dropout", 0.0),
                     "target_modules": sorted(config.get("target_modules") or [])
                     if isinstance(config.get("target_modules"), list) else config.get("target_modules")},
            "data": {"files": [], "sha256": "", "rows": 0, "source": f"hf://{where}"},
            "config": {"imported": {"repo": repo_id, "subfolder": subfolder, "commit": commit, "base_model_id": base_id,
                                    "seed": "unknown (trained outside cladapt)"}},
            "seed": 0,
            "parents": [],
        }
        rec = store.commit(staging, status=status, reason=f"imported PEFT LoRA {where}", actor="cladapt pull")
    reason = "the task has an active version, so this one is a candidate" if has_active else ""
    return {"remote": where, "local": str(rec.ref), "action": "imported", "status": status, "reason": reason}
