"""Summed adapters on another base model are never dropped without a word.

A sum method (inc-lora, olora, ...) trained on a second base model used to fold zero earlier
adapters silently, and ``export --merged`` left the other base's adapters out with the warning
computed in the CLI. Training now warns and records the refs it leaves out
(``train_stats.other_base_versions``); the export's result carries ``skipped``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_run, tiny_overrides

from cladapt.registry.store import Store


def _train(store: Store, base: Path, loaded: Any, task: str, data: Path, method: str):  # noqa: ANN202
    from cladapt.config import load_config
    from cladapt.train.run import train_task

    cfg = load_config(method=method, overrides=[f"base_model={base}", *tiny_overrides(**{"train.max_steps": 1})])[0]
    return train_task(store, task, [str(data)], cfg, loaded=loaded)


@pytest.mark.parametrize("method", ["inc-lora", "olora"])
def test_sum_method_on_another_base_says_what_it_leaves_out(
    store: Store, tiny_base_path: Path, tiny_loaded: Any, two_tasks: dict[str, Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture, method: str,
) -> None:
    from tiny import build_tiny

    from cladapt.adapters.export import export_merged
    from cladapt.base_model import load

    first = _train(store, tiny_base_path, tiny_loaded, "sentiment", two_tasks["sentiment"], method)
    assert "other_base_versions" not in first.manifest.train_stats
    other = build_tiny(tmp_path / "other-base", seed=1)
    with caplog.at_level(logging.WARNING, logger="cladapt"):
        second = _train(store, other, load(str(other)), "topics", two_tasks["topics"], method)
    assert second.manifest.parents == []  # nothing folded: the first adapter belongs to the other base
    assert second.manifest.train_stats["other_base_versions"] == ["sentiment@1"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("folds 0 earlier adapter(s)" in m and "sentiment@1" in m and str(tiny_base_path) in m for m in warned)

    result = export_merged(store, tmp_path / "merged")
    assert result.refs == ["topics@1"] and result.skipped == ["sentiment@1"]
    out = cli_run("export", "--registry", store.root, "--merged", tmp_path / "merged-cli")
    assert "exported 1 adapters (topics@1)" in out.output
    assert "left out sentiment@1: trained on another base model" in out.output


def test_same_base_sequence_has_nothing_to_say(
    store: Store, tiny_base_path: Path, tiny_loaded: Any, two_tasks: dict[str, Path], tmp_path: Path,
) -> None:
    from cladapt.adapters.export import export_merged

    _train(store, tiny_base_path, tiny_loaded, "sentiment", two_tasks["sentiment"], "inc-lora")
    second = _train(store, tiny_base_path, tiny_loaded, "topics", two_tasks["topics"], "inc-lora")
    assert second.manifest.parents == ["sentiment@1"] and "other_base_versions" not in second.manifest.train_stats
    result = export_merged(store, tmp_path / "merged")
    assert result.refs == ["sentiment@1", "topics@1"] and result.skipped == []
