"""Helpers shared by the Hub tests (importable as ``hub_helpers``; tests/hub is put on sys.path by conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BASE_ID = "cladapt-test/tiny-llama"  # the Hub id the tests give the tiny local base


def lora_files(base_path: Path, out: Path, *, seed: int, base_id: str = BASE_ID, r: int = 4) -> Path:
    """A real PEFT LoRA of the tiny model with random (non-zero) B, saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path)
    model.name_or_path = base_id  # what PEFT writes as base_model_name_or_path (else the local folder)
    config = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        base_model_name_or_path=base_id)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    return out


def random_lora(template: Path, out: Path, *, seed: int, base_id: str) -> Path:
    """A copy of the PEFT-saved ``template`` with seeded random weights (same keys and shapes) and
    ``base_model_name_or_path`` set to ``base_id``: as real as save_pretrained, without loading a model."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((template / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_id
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in load_file(template / "adapter_model.safetensors").items()}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def add_version(store: Any, template: Path, info: Any, task: str, *, seed: int, parents: tuple[str, ...] = (),
                status: str = "active", score: float = 50.0) -> Any:
    """Commit one version the way training does: PEFT files, a sidecar, a manifest with an eval row."""
    import torch

    with store.stage(task) as staging:
        random_lora(template, staging.adapter_dir, seed=seed, base_id=str(info.path))
        staging.write_tensors("basis.safetensors", {"U": torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))})
        staging.write_json("state.json", {"seen": seed})
        staging.manifest_fields = {
            "method": "inc-lora", "method_config": {"name": "inc-lora"}, "composition": "sum",
            "base_model": info.as_dict(),
            "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "data": {"files": [f"/data/{task}.jsonl"], "sha256": "ab" * 32, "rows": 16},
            "config": {"seed": seed}, "seed": seed, "parents": list(parents),
            "train_stats": {"steps": 3},
            "metrics": {"score": score, "eval": {
                "rule": {"id": "cladapt-eval-1"}, "mode": "generate",
                "scores": {task: {"score": score, "metric": "exact_match", "n": 16}, "other": {"score": 12.5, "metric": "exact_match", "n": 16}},
                "before": {task: {"score": 0.0}}, "baseline": {task: {"score": 6.25}}}},
        }
        return store.commit(staging, status=status)
