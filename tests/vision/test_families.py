"""Tiny random LLaVA, LLaVA-NeXT, LLaVA-OneVision, Idefics3, SmolVLM, Qwen2-VL and Qwen2.5-VL: load, train, evaluate, export, reload.

Each family is built from a config in seconds, offline (``tiny_vlm.py``). One task of image rows
trains a few steps through ``train_task``; the exported adapter, loaded on a fresh base by plain
``PeftModel.from_pretrained``, must give the same logits on an image prompt as cladapt's own
loading, and different ones from the base (so the parity is not trivial).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides

_NO_NUM2WORDS = importlib.util.find_spec("num2words") is None
FAMILIES = ["llava", "idefics3", "qwen2_vl", "llava_next", "qwen2_5_vl", "llava_onevision",
            pytest.param("smolvlm", marks=pytest.mark.skipif(
                _NO_NUM2WORDS, reason="SmolVLMProcessor raises ImportError without the num2words package "
                                      "(pip install 'cladapt[vision]')"))]


def _cfg(base: Path, method: str = "lora", **extra: Any) -> Any:
    from cladapt.config import load_config

    over = tiny_overrides(**{"train.max_steps": 2, "train.max_length": 128, **extra})
    return load_config(method=method, overrides=[*over, f"base_model={base}"])[0]


def image_logits(model: Any, tok: Any, conv: list[dict[str, Any]]) -> torch.Tensor:
    from cladapt.text.template import render
    from cladapt.vision import conversation_images, prompt_batch

    batch = prompt_batch(tok, [render(tok, conv)], [conversation_images(conv)])
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_load_fingerprint_covers_the_processor(family: str, vlm_paths: dict[str, Path], tmp_path: Path) -> None:
    from cladapt.base_model import load
    from cladapt.vision import VisionTokenizer
    from cladapt.vision import family as family_of

    model, tok, info = load(str(vlm_paths[family]))
    assert isinstance(tok, VisionTokenizer) and family_of(model) == family
    copy = Path(shutil.copytree(vlm_paths[family], tmp_path / "copy"))
    assert load(str(copy))[2].fingerprint == info.fingerprint
    # transformers 5 saves the image processor inside processor_config.json; hub snapshots of
    # older models keep it in preprocessor_config.json
    cfg_file = next(p for p in (copy / "preprocessor_config.json", copy / "processor_config.json") if p.is_file())
    pre = json.loads(cfg_file.read_text())
    (pre.get("image_processor") or pre)["image_mean"] = [0.5, 0.5, 0.5]
    cfg_file.write_text(json.dumps(pre))
    assert load(str(copy))[2].fingerprint != info.fingerprint, "image preprocessing is part of the base"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_the_language_model_unless_scope_all(family: str, vlm_paths: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model

    from cladapt.base_model import load
    from cladapt.vision import language_model_path, scope_targets

    model, _, _ = load(str(vlm_paths[family]))
    lm = language_model_path(model)

    def adapted(scope: str) -> list[str]:
        # Qwen2-VL's vision tower calls its attention projection qkv
        cfg = scope_targets(LoraConfig(r=2, target_modules=["q_proj", "v_proj", "qkv"]), model, scope)
        peft_model = get_peft_model(model, cfg)
        names = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.endswith(("q_proj", "v_proj", "qkv"))]
        peft_model.unload()
        return names

    own = adapted("language_model")
    assert own and all(f".{lm}." in n for n in own)
    everything = adapted("all")
    assert set(own) < set(everything), "plain names also reach the vision tower"


@pytest.mark.parametrize("family", FAMILIES)
def test_train_evaluate_export_reload_in_plain_peft(
    family: str, vlm_paths: dict[str, Path], image_tasks: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from cladapt.adapters.export import export_version
    from cladapt.adapters.loading import attach
    from cladapt.base_model import load
    from cladapt.data.rows import load_examples
    from cladapt.evaluation.scoring import evaluate, load_eval_set
    from cladapt.registry.store import Store
    from cladapt.train.run import train_task

    base = vlm_paths[family]
    store = Store.init(tmp_path / "reg")
    rec = train_task(store, "colour", [str(image_tasks["colour"])], _cfg(base))
    assert rec.manifest.train_stats["steps"] == 2 and rec.manifest.data["rows"] == 8
    cfg = json.loads((store.adapter_dir("colour@1") / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str) and "q_proj" in cfg["target_modules"]

    model, tok, info = load(str(base))
    base_logits_conv = load_examples([image_tasks["colour"]]).examples[0].prompt_messages
    base_logits = image_logits(model, tok, base_logits_conv)
    model, _ = attach(model, store, info, ["colour"])
    ours = image_logits(model, tok, base_logits_conv)
    assert (ours - base_logits).abs().max() > 1e-5

    res = evaluate(model, tok, load_eval_set(image_tasks["colour"]), mode="both", max_new_tokens=3, batch_size=4)
    assert res.n == 8 and res.kind == "classification" and res.constrained is not None
    assert 0.0 <= res.exact_match <= 100.0 and 0.0 <= res.constrained <= 100.0

    out = export_version(store, "colour", tmp_path / "export").out
    fresh = AutoModelForImageTextToText.from_pretrained(base)
    plain = PeftModel.from_pretrained(fresh, str(out))
    assert torch.allclose(image_logits(plain, tok, base_logits_conv), ours, rtol=1e-5, atol=1e-5)
