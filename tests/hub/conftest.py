"""Fixtures for the Hub tests: a loopback fake Hub, the client pointed at it, and a small registry.

huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` when it is imported; in this process it
is already imported (offline), so ``hub_env`` flips the offline constant and sets ``HF_ENDPOINT`` /
``HF_TOKEN`` in the environment, which cladapt reads at call time. Subprocess tests get a clean
environment with the same variables set before import.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.append(str(Path(__file__).parent))  # fake_hub.py, hub_helpers.py; appended so `conftest` stays tests/conftest.py

from fake_hub import FakeHub  # noqa: E402
from hub_helpers import add_version, lora_files  # noqa: E402


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never the user's token or cache
    return fake_hub


@pytest.fixture(scope="session")
def lora_template(tiny_base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One adapter saved by PEFT's own save_pretrained; versions are random copies of it."""
    return lora_files(tiny_base_path, tmp_path_factory.mktemp("lora-template"), seed=0)


@pytest.fixture
def tiny_info(tiny_base_path: Path) -> Any:
    from cladapt.base_model import BaseModelInfo, fingerprint_folder

    fp, tok = fingerprint_folder(tiny_base_path)
    return BaseModelInfo(str(tiny_base_path), tiny_base_path, fp, tok)


@pytest.fixture
def src_store(tmp_path: Path, lora_template: Path, tiny_info: Any) -> Any:
    """sentiment@1 (archived), sentiment@2 (active), topics@1 (child of sentiment@2), an evaluation,
    shared state and a policy."""
    from cladapt.registry import Store

    store = Store.init(tmp_path / "src")
    add_version(store, lora_template, tiny_info, "sentiment", seed=1, score=40.0)
    add_version(store, lora_template, tiny_info, "sentiment", seed=2, parents=("sentiment@1",), score=60.0)
    add_version(store, lora_template, tiny_info, "topics", seed=3, parents=("sentiment@2",), score=75.0)
    store.add_evaluation("topics@1", "eval-topics", {"score": 75.0, "n": 16})
    records = tmp_path / "records.json"
    records.write_text('{"mean": [0.1, 0.2]}')
    store.write_shared("gere", tiny_info.fingerprint, {"records.json": records})
    store.set_policy({"min_score": 10})
    return store
