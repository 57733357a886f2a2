"""Any PEFT LoRA repo on the Hub becomes a version; a wrong base model or a non-LoRA is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hub_helpers import BASE_ID, random_lora

from cladapt.errors import IncompatibleBaseModel, IntegrityError, RegistryError, UsageError
from cladapt.registry import Store
from cladapt.registry.hub import pull

REPO = "some-user/plain-peft-lora"


def _upload(hub: Any, folder: Path, repo: str = REPO) -> None:
    """Publish a folder with the real client, as any PEFT user would (push_to_hub does the same)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=folder)


def _pull(store: Store, tiny_base_path: Path, **kwargs: Any) -> Any:
    options = {"tasks": ["legal"], "base_model": str(tiny_base_path), "base_model_id": BASE_ID, **kwargs}
    return pull(store, options.pop("repo", REPO), **options)


def test_plain_peft_repo_becomes_a_version(hub_env: Any, tmp_path: Path, lora_template: Path, tiny_base_path: Path) -> None:
    folder = random_lora(lora_template, tmp_path / "plain", seed=5, base_id=BASE_ID)
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\nsomeone's adapter\n")
    _upload(hub_env, folder)
    dst = Store.init(tmp_path / "dst")
    res = _pull(dst, tiny_base_path)
    assert [(v.local, v.action, v.status) for v in res.versions] == [("legal@1", "imported", "active")]
    rec = dst.get("legal@1")
    assert (rec.path / "adapter/adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
    assert rec.method == "lora" and rec.r == 4 and rec.manifest.config["imported"]["repo"] == REPO
    from cladapt.base_model import fingerprint_folder

    assert rec.base_fingerprint == fingerprint_folder(tiny_base_path)[0]
    assert sorted(e.path for e in rec.manifest.files) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    again = _pull(dst, tiny_base_path)
    assert [(v.local, v.action) for v in again.versions] == [("legal@1", "present")]
    assert len(dst.list()) == 1


def test_plain_peft_repo_in_a_subfolder(hub_env: Any, tmp_path: Path, lora_template: Path, tiny_base_path: Path) -> None:
    random_lora(lora_template, tmp_path / "multi" / "run-7", seed=6, base_id=BASE_ID)
    _upload(hub_env, tmp_path / "multi", "some-user/many-loras")
    dst = Store.init(tmp_path / "dst")
    res = _pull(dst, tiny_base_path, repo="some-user/many-loras", subfolder="run-7")
    assert res.imported[0].local == "legal@1"


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda cfg, d: cfg.update(base_model_name_or_path="meta-llama/Llama-3.1-8B"), IncompatibleBaseModel, "made for 'meta-llama/Llama-3.1-8B'"),
        (lambda cfg, d: cfg.update(peft_type="IA3"), RegistryError, "is a 'IA3' adapter, not a LoRA"),
        (lambda cfg, d: cfg.update(use_dora=True), RegistryError, "uses DoRA"),
        (lambda cfg, d: _reshape(d), IncompatibleBaseModel, "does not fit"),
        (lambda cfg, d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), IntegrityError, "a pickle"),
    ],
    ids=["other-base", "not-lora", "dora", "wrong-shapes", "pickle-only"],
)
def test_mismatched_or_unsupported_adapters_are_refused(
    hub_env: Any, tmp_path: Path, lora_template: Path, tiny_base_path: Path, edit: Any, error: type, message: str
) -> None:
    folder = random_lora(lora_template, tmp_path / "plain", seed=5, base_id=BASE_ID)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    edit(cfg, folder)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    _upload(hub_env, folder)
    dst = Store.init(tmp_path / "dst")
    with pytest.raises(error, match=message):
        _pull(dst, tiny_base_path)
    assert dst.list() == [] and list((dst.work_dir / "staging").iterdir()) == []


def _reshape(folder: Path) -> None:
    """Weights made for a model with another hidden size (the tiny model has 64)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = {k: torch.zeros(v.shape[0], 96) if "lora_A" in k else v for k, v in load_file(path).items()}
    save_file(tensors, path)


def test_a_plain_repo_needs_a_task(hub_env: Any, tmp_path: Path, lora_template: Path) -> None:
    _upload(hub_env, random_lora(lora_template, tmp_path / "plain", seed=5, base_id=BASE_ID))
    with pytest.raises(UsageError, match="not a cladapt repo"):
        pull(Store.init(tmp_path / "dst"), REPO)
