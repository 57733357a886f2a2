"""Helpers of the server tests (importable as ``serve_helpers``): a registry of distinct LoRA versions on the tiny model.

Versions are committed the way training commits them (PEFT files + manifest + a routing
signature sidecar), with ``lora_B`` drawn at random so every adapter changes the greedy output
(with B = 0 every adapter would be the identity and every parity check would pass trivially).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROUTE_TASKS = {
    "sentiment": ["the film was great", "the film was terrible", "a good movie", "a boring story", "bad plot"],
    "topics": ["the company does business", "the actor plays sports", "science and technology",
               "the village album", "a world company"],
}
SUM_TASKS = ("news", "qa")


def lora_folder(base: Any, out: Path, *, seed: int, base_id: str, r: int = 4) -> None:
    """A PEFT LoRA folder for ``base`` with random, clearly non-zero weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                     base_model_name_or_path=base_id)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.6)
    model.save_pretrained(out, safe_serialization=True)
    model.unload()  # leaves the base model as it was, for the next adapter


def add_version(store: Any, loaded: tuple[Any, Any, Any], task: str, *, seed: int, composition: str = "route",
                prompts: list[str] | None = None, r: int = 4, status: str = "active") -> Any:
    """Commit one version like training does (with a routing signature when ``prompts`` are given).

    ``loaded`` is the base model's ``(model, tokenizer, info)``; the model is left unchanged.
    """
    from cladapt.features import SIGNATURE_STEM, build_signature

    model, tok, info = loaded
    with store.stage(task) as staging:
        lora_folder(model, staging.adapter_dir, seed=seed, base_id=str(info.path), r=r)
        if prompts:
            sig = build_signature(model, tok, prompts, ["x"] * len(prompts), adapter=None, encoder=None,
                                  base_fingerprint=info.fingerprint)
            staging.write_tensors(f"{SIGNATURE_STEM}.safetensors", sig.tensors())
            staging.write_json(f"{SIGNATURE_STEM}.json", sig.to_json())
        staging.manifest_fields = {
            "method": "lora" if composition == "route" else "inc-lora", "method_config": {},
            "composition": composition, "base_model": info.as_dict(),
            "lora": {"r": r, "alpha": 2.0 * r, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "data": {"files": [f"{task}.jsonl"], "sha256": "ab" * 32, "rows": 5},
            "config": {"seed": seed}, "seed": seed, "parents": [], "train_stats": {"steps": 1}, "metrics": {},
        }
        return store.commit(staging, status=status)


def start_server(registry: Path, base: Path, **settings: Any) -> Any:
    """A started :class:`Server` on the tiny model (the caller closes it)."""
    from cladapt.registry.store import Store
    from cladapt.serve.server import Server, load_serve_config

    config = load_serve_config(base_model=str(base), served_model_name="tiny", **settings)
    return Server(config, Store.open(registry)).start()


def sse_events(text: str) -> list[Any]:
    """The JSON payloads of a server-sent-events body, up to ``[DONE]``."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
