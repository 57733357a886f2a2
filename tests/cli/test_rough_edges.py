"""What a user reads: metrics as tables, the audit log's first state, no weight-loading bars, --json where missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_run, set_args, task_rows, write_jsonl


@pytest.fixture
def evaluated(tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]) -> Path:
    """A registry with sentiment@1, scored on held-out rows after training (metrics recorded)."""
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    test = write_jsonl(tmp_path / "sentiment-test.jsonl", task_rows("sentiment", 4))
    cli_run("train", "--registry", reg, "--task", "sentiment", "--data", two_tasks["sentiment"], "--eval-data", test,
            "--base-model", tiny_base_path, *set_args(**{"eval.max_new_tokens": 3}))
    return reg


def test_show_prints_metrics_and_training_as_tables(evaluated: Path) -> None:
    out = cli_run("show", "--registry", evaluated, "sentiment@1").stdout
    metrics = json.loads(cli_run("show", "--registry", evaluated, "sentiment@1", "--json").stdout)["metrics"]
    assert metrics and "{'" not in out  # no raw dict
    assert "metrics" in out and "training" in out
    assert any(line.split("│")[1].strip().startswith("eval.") for line in out.splitlines() if line.count("│") >= 3)
    assert "train_loss" in out and "steps" in out


def test_log_names_the_first_state(evaluated: Path) -> None:
    out = cli_run("log", "--registry", evaluated).stdout
    assert "(new) -> active" in out and "None" not in out


def test_model_loads_print_no_bars(tiny_base_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    from cladapt.base_model import load

    assert hf_logging.is_progress_bar_enabled()
    load(str(tiny_base_path))
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled()  # transformers' own switch is restored after the load
