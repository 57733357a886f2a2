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


def test_generate_json_and_auto_budget(evaluated: Path) -> None:
    from cladapt.budget import DEFAULT_MAX_NEW_TOKENS

    out = json.loads(cli_run("generate", "--registry", evaluated, "--adapter", "sentiment", "--max-new-tokens", "auto",
                             "--json", "the film was great", "the film was terrible").stdout)
    assert [r["prompt"] for r in out] == ["the film was great", "the film was terrible"]
    assert all(isinstance(r["answer"], str) for r in out)
    assert out[0]["refs"] == ["sentiment@1"] and out[0]["composition"] == "adapter"
    assert out[0]["max_new_tokens"] == 3  # the budget sentiment@1's own evaluation used
    base = json.loads(cli_run("generate", "--registry", evaluated, "--json", "--max-new-tokens", "2", "hi").stdout)
    assert base[0]["composition"] == "base" and base[0]["refs"] == [] and base[0]["max_new_tokens"] == 2
    from click.testing import CliRunner

    from cladapt.cli import cli

    shown = CliRunner().invoke(cli, ["generate", "--help"]).output
    assert f"[default: {DEFAULT_MAX_NEW_TOKENS}]" in shown and "auto" in shown
    bad = cli_run("generate", "--registry", evaluated, "--max-new-tokens", "lots", "hi", ok=False)
    assert bad.exit_code == 2 and "positive number of tokens or 'auto'" in bad.output


def test_registry_verify_json(evaluated: Path) -> None:
    report = json.loads(cli_run("registry", "verify", evaluated, "--json").stdout)
    assert report["ok"] and report["problems"] == [] and report["checked"]["versions"] == 1
    weights = next((evaluated / "tasks" / "sentiment" / "v1" / "adapter").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    bad = cli_run("registry", "verify", evaluated, "--json", ok=False)
    report = json.loads(bad.stdout)
    assert bad.exit_code == 1 and not report["ok"]
    assert any("adapter_model.safetensors" in p["where"] + p["message"] for p in report["problems"])


def test_eval_records_are_named_after_the_task_not_the_file(evaluated: Path, tmp_path: Path) -> None:
    held_out = write_jsonl(tmp_path / "sentiment_test.jsonl", task_rows("sentiment", 4))  # rows without a task field
    out = cli_run("eval", "--registry", evaluated, "--adapter", "sentiment", "--data", held_out,
                  "--max-new-tokens", "auto").stdout
    assert "recorded on sentiment@1 as eval-sentiment" in out
    cli_run("eval", "--registry", evaluated, "--adapter", "sentiment", "--data", held_out, "--name", "eval-sentiment-hard",
            "--max-new-tokens", "2")
    evals = json.loads(cli_run("show", "--registry", evaluated, "sentiment@1", "--json").stdout)["evaluations"]
    assert set(evals) == {"eval-sentiment", "eval-sentiment-hard"}
    assert evals["eval-sentiment"]["max_new_tokens"] > 2 and evals["eval-sentiment-hard"]["max_new_tokens"] == 2
    bad = cli_run("eval", "--data", held_out, "--name", "x", "--base-model", evaluated, ok=False)
    assert bad.exit_code == 2 and "--name names a record on a version" in bad.output


def test_training_evaluation_takes_auto(tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]) -> None:
    from cladapt.base_model import load_tokenizer
    from cladapt.evaluation.scoring import auto_max_new_tokens

    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    test = write_jsonl(tmp_path / "t.jsonl", task_rows("sentiment", 4))
    cli_run("train", "--registry", reg, "--task", "sentiment", "--data", two_tasks["sentiment"], "--eval-data", test,
            "--base-model", tiny_base_path, *set_args(**{"eval.max_new_tokens": "auto"}))
    scores = json.loads(cli_run("show", "--registry", reg, "sentiment@1", "--json").stdout)["metrics"]["eval"]
    expected = auto_max_new_tokens(load_tokenizer(str(tiny_base_path)), ["negative", "positive"])
    assert scores["scores"]["sentiment"]["max_new_tokens"] == expected
    assert str(scores["rule"]["max_new_tokens"]).startswith("auto")
