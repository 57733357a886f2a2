"""train.report_to goes to the Trainer's own integrations; TensorBoard writes only inside the registry or where told."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_run, set_args


def _events(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


def _scalars(event_file: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_file))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_tensorboard_logs_are_kept_with_the_version(tmp_path: Path, tiny_base_path: Path, two_tasks) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in the dev extra)")
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    cli_run("train", "--registry", reg, "--task", "sentiment", "--data", two_tasks["sentiment"],
            "--base-model", tiny_base_path, *set_args(**{"train.report_to": "tensorboard"}))
    shown = json.loads(cli_run("show", "--registry", reg, "sentiment@1", "--json").stdout)
    kept = Path(shown["path"]) / "logs" / "tensorboard"
    (event_file,) = _events(kept)
    assert "train/loss" in _scalars(event_file)
    assert any(f["path"].startswith("logs/tensorboard/events.out.tfevents.") for f in shown["files"])  # checksummed
    assert not _events(tmp_path / "reg" / ".work") and not (Path.cwd() / "runs").exists()  # nowhere else
    assert "registry OK" in cli_run("registry", "verify", reg).output
    curve = shown["train_stats"]["loss_curve"]
    assert [step for step, _ in curve] == [1, 2, 3] and all(loss > 0 for _, loss in curve)


def test_tensorboard_into_a_folder_of_the_users(tmp_path: Path, tiny_base_path: Path, two_tasks) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in the dev extra)")
    reg, logs = tmp_path / "reg", tmp_path / "my-logs"
    cli_run("registry", "init", reg)
    cli_run("train", "--registry", reg, "--task", "sentiment", "--data", two_tasks["sentiment"],
            "--base-model", tiny_base_path,
            *set_args(**{"train.report_to": "[tensorboard]", "train.logging_dir": str(logs)}))
    assert len(_events(logs)) == 1 and "train/loss" in _scalars(_events(logs)[0])
    assert not _events(reg)  # the user's folder only


def test_report_to_none_and_bad_names(tmp_path: Path, tiny_base_path: Path, two_tasks) -> None:
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    bad = cli_run("train", "--registry", reg, "--task", "s", "--data", two_tasks["sentiment"], "--base-model",
                  tiny_base_path, *set_args(**{"train.report_to": "comet"}), ok=False)
    assert bad.exit_code == 1 and "train.report_to" in bad.output and "'tensorboard', 'wandb' or 'mlflow'" in bad.output
    cli_run("train", "--registry", reg, "--task", "s", "--data", two_tasks["sentiment"], "--base-model",
            tiny_base_path, *set_args(**{"train.report_to": "none"}))
    assert not _events(tmp_path)
