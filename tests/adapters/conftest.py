"""Fixtures for the method property tests (helpers live in ``method_helpers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.append(str(Path(__file__).parent))  # method_helpers; appended so `conftest` stays tests/conftest.py

from method_helpers import FakeHistory  # noqa: E402


@pytest.fixture
def history() -> FakeHistory:
    return FakeHistory()


@pytest.fixture
def tiny_model(tiny_base_path: Any) -> Any:
    """A fresh tiny base model (no tokenizer needed for most property tests)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_path), dtype=torch.float32)
    model.eval()
    return model
