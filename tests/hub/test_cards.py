"""Cards and adapter configs of versions trained on cladapt's default base model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from hub_helpers import add_version

from cladapt.registry import Store
from cladapt.registry.cards import vllm_max_lora_rank
from cladapt.registry.hub import push
from cladapt.registry.hub_layout import hub_base_id, is_hub_id


def test_default_alias_is_pushed_as_the_real_id_with_the_gguf_note(hub_env: Any, tmp_path: Path, lora_template: Path, tiny_info: Any) -> None:
    store = Store.init(tmp_path / "reg")
    add_version(store, lora_template, replace(tiny_info, id="smollm2-135m-instruct"), "amazon", seed=1, score=81.25)
    push(store, "org/cladapt-amazon", "amazon@1")  # no --base-model-id needed
    files = hub_env.head_files("org/cladapt-amazon")
    real = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == real
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == real and f"base_model:adapter:{real}" in meta["tags"]
    assert "Q4_1 GGUF" in card and tiny_info.fingerprint in card
    results = meta["model-index"][0]["results"]
    assert {(r["dataset"]["name"], r["metrics"][0]["value"]) for r in results} == {("amazon", 81.25), ("other", 12.5)}
    assert "| amazon | exact_match | 81.25 | 0.00 | 6.25 | 16 |" in card  # the accuracy-matrix row
    assert "--max-lora-rank 8" in card and 'PeftModel.from_pretrained(base, "org/cladapt-amazon")' in card


def test_hub_ids() -> None:
    assert hub_base_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert not is_hub_id("/models/x") and not is_hub_id("./a/b") and not is_hub_id("a/../b")
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 12, 300, 600)] == [1, 8, 8, 16, 320, 512]
