"""Under torchrun every command prints from process 0 only (issue: `forget` printed once per process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import cli_run, set_args, task_rows, write_jsonl

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from launching import launch, only_version, torchrun  # noqa: E402


def test_followers_print_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert ("(empty" in cli_run("list", "--registry", reg).stdout) is shown, rank
        assert (cli_run("list", "--registry", reg, "--json").stdout.strip() == "[]") is shown, rank
    monkeypatch.delenv("RANK")
    assert "(empty" in cli_run("list", "--registry", reg).stdout


@pytest.mark.multiprocess
def test_forget_under_torchrun_commits_and_prints_once(tmp_path: Path, tiny_base_path: Path) -> None:
    forget = write_jsonl(tmp_path / "forget.jsonl", task_rows("topics", 8))
    retain = write_jsonl(tmp_path / "retain.jsonl", task_rows("sentiment", 8))
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    out = launch(torchrun(), ["forget", "--task", "forget-topics", "--forget", forget, "--retain", retain,
                              "--registry", reg, "--base-model", tiny_base_path,
                              *set_args(**{"train.batch_size": 2, "train.max_steps": 2})], tmp_path)
    assert out.count("committed as") == 1, out[-3000:]
    manifest, _ = only_version(reg, "forget-topics")
    assert manifest["train_stats"]["processes"] == 2 and manifest["method"] == "gslora"
    assert json.loads(cli_run("list", "--registry", reg, "--json").stdout)[0]["task"] == "forget-topics"
