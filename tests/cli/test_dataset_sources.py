"""--data takes dataset folders and dataset names (datasets.load_dataset), offline, with the same row checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_run, set_args, task_rows, write_jsonl

from cladapt.data.rows import load_examples
from cladapt.data.sources import parse_source, with_split
from cladapt.errors import DataError


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A DatasetDict written by save_to_disk: train (16 rows) and test (4 rows)."""
    import datasets

    folder = tmp_path / "saved-sentiment"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(task_rows("sentiment", 16)),
        "test": datasets.Dataset.from_list(task_rows("sentiment", 4)),
    }).save_to_disk(str(folder))
    return folder


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A script-free dataset folder: one data file per split."""
    folder = tmp_path / "topics-dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", task_rows("topics", 12))
    write_jsonl(folder / "test.jsonl", task_rows("topics", 6))
    return folder


def test_sources_are_told_apart() -> None:
    assert parse_source("imdb").kind == "dataset" and parse_source("imdb").split == "train"
    assert (parse_source("imdb:test").text, parse_source("imdb:test").split) == ("imdb", "test")
    assert parse_source("org/name", split="validation").split == "validation"
    assert parse_source("missing.jsonl").kind == "file"  # a data-file suffix is never a dataset name
    assert parse_source("./missing").kind == "file"  # nor is a path
    assert with_split(["a.jsonl", "imdb", "imdb:test"], "validation") == ["a.jsonl", "imdb:validation", "imdb:test"]


def test_saved_dataset_splits_and_manifest_entry(saved: Path) -> None:
    train = load_examples([saved])
    test = load_examples([saved], split="test")
    assert (len(train.examples), len(test.examples)) == (16, 4)
    assert len(load_examples([f"{saved}:test"]).examples) == 4
    entry = test.manifest_data()["sources"][0]
    assert entry["dataset"] == str(saved.resolve()) and entry["split"] == "test" and entry["rows"] == 4
    assert entry["fingerprint"] and entry["fingerprint"] != train.sources[0]["fingerprint"]
    assert test.examples[0].where == f"{saved}[test]:1"


def test_dataset_folder_of_data_files(data_dir: Path) -> None:
    assert len(load_examples([data_dir]).examples) == 12
    assert len(load_examples([data_dir], split="test").examples) == 6


def test_bad_dataset_rows_name_the_split_row_and_field(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    rows = task_rows("sentiment", 3)
    rows[1] = {"instruction": "x", "input": "y", "ouput": "z"}
    write_jsonl(folder / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_examples([folder])
    text = str(info.value)
    assert f"{folder}[train]:2: unknown field(s) ['ouput']" in text and f"{folder}[train]:2: missing field 'output'" in text


def test_unknown_name_and_split_are_clear_errors(saved: Path) -> None:
    with pytest.raises(DataError, match=r"no-such-dataset-xyz\[train\]: not a dataset"):
        load_examples(["no-such-dataset-xyz"])
    with pytest.raises(DataError, match=r"no split 'dev' \(has train, test\)"):
        load_examples([saved], split="dev")


def test_data_check_takes_a_dataset_and_a_split(saved: Path) -> None:
    report = json.loads(cli_run("data", "check", saved, "--data-split", "test", "--no-tokens", "--json").stdout)
    assert report["ok"] and report["rows"] == 4 and report["files"] == {f"{saved}[test]": 4}
    bad = cli_run("data", "check", saved, "--data-split", "dev", "--no-tokens", ok=False)
    assert bad.exit_code == 1 and "no split 'dev'" in bad.output


def test_train_records_the_dataset_in_the_manifest(tmp_path: Path, tiny_base_path: Path, saved: Path,
                                                   data_dir: Path) -> None:
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    cli_run("train", "--registry", reg, "--task", "sentiment", "--data", saved, "--data-split", "train",
            "--base-model", tiny_base_path, *set_args())
    data = json.loads(cli_run("show", "--registry", reg, "sentiment@1", "--json").stdout)["data"]
    (source,) = data["sources"]
    assert source["dataset"] == str(saved.resolve()) and source["split"] == "train" and source["rows"] == 16
    assert source["fingerprint"] and data["rows"] == 16 and data["files"] == [f"{saved.resolve()}[train]"]
    cli_run("train", "--registry", reg, "--task", "topics", "--data", f"{data_dir}:test",
            "--base-model", tiny_base_path, *set_args())
    data = json.loads(cli_run("show", "--registry", reg, "topics@1", "--json").stdout)["data"]
    assert data["sources"][0]["split"] == "test" and data["rows"] == 6


def test_eval_scores_a_dataset_split(tmp_path: Path, tiny_base_path: Path, saved: Path) -> None:
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    cli_run("train", "--registry", reg, "--task", "sentiment", "--data", saved, "--base-model", tiny_base_path,
            *set_args())
    out = json.loads(cli_run("eval", "--registry", reg, "--adapter", "sentiment", "--data", saved, "--data-split", "test",
                             "--max-new-tokens", "2", "--json").stdout)
    assert out["n"] == 4 and out["files"] == [f"{saved.resolve()}[test]"]
    assert "eval-sentiment" in json.loads(cli_run("show", "--registry", reg, "sentiment", "--json").stdout)["evaluations"]
