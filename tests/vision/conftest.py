"""Fixtures for vision-language tests: tiny random VLMs (one per family) and small image tasks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).parent))  # tiny_vlm, vision_helpers; appended so `conftest` stays tests/conftest.py

from vision_helpers import image_task_rows, write_rows  # noqa: E402


@pytest.fixture(scope="session")
def vlm_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Lazily built tiny VLM folders, one per family (each built once per session)."""
    from tiny_vlm import build_tiny_vlm

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, family: str) -> Path:
            self[family] = build_tiny_vlm(tmp_path_factory.mktemp(f"vlm-{family}"), family)
            return self[family]

    return Lazy()


@pytest.fixture
def image_tasks(tmp_path: Path) -> dict[str, Path]:
    """colour (instruction rows) and shape (chat rows) tasks, images relative to the files."""
    return {
        "colour": write_rows(tmp_path / "colour.jsonl", image_task_rows("colour", tmp_path)),
        "shape": write_rows(tmp_path / "shape.jsonl", image_task_rows("shape", tmp_path, chat=True)),
    }
