"""Bad config and data values are refused with the key, file and line named, before any training.

Each of these used to be accepted (or to end in a raw traceback after the model loaded):
``lora.r=1000`` on a 64-wide model, ``train.max_steps=-5``, ``--seed -1``,
``lora.target_modules=[nosuch_proj]``, ``eval --limit -3`` and a row with ``"input": null``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_run, set_args, task_rows, tiny_overrides, write_jsonl

from cladapt.config import load_config
from cladapt.errors import ConfigError, DataError
from cladapt.registry.store import Store


@pytest.mark.parametrize(("override", "key", "words"), [
    ("train.max_steps=-5", "train.max_steps", "-1 (train for `epochs`) or a positive number"),
    ("train.max_steps=0", "train.max_steps", "positive number of steps"),
    ("train.seed=-1", "train.seed", "greater than or equal to 0"),
    ("train.seed=4294967296", "train.seed", "less than or equal to 4294967295"),
    ("asd.seed=-1", "asd.seed", "greater than or equal to 0"),
])
def test_config_values_out_of_range(override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert f"--set {override}: {key}" in str(err.value) and words in str(err.value)


def test_max_steps_minus_one_still_means_epochs() -> None:
    assert load_config(overrides=["train.max_steps=-1"])[0].train.max_steps == -1


def _train(store: Store, tiny_base_path: Path, tiny_loaded: Any, data: Path, **extra: object) -> None:
    from cladapt.train.run import train_task

    cfg = load_config(overrides=[f"base_model={tiny_base_path}", *tiny_overrides(**extra)])[0]
    train_task(store, "sentiment", [str(data)], cfg, loaded=tiny_loaded)


@pytest.mark.parametrize(("extra", "key", "words"), [
    ({"lora.r": 1000}, "lora.r", "1000 is above the rank a LoRA on model.layers.0.self_attn.v_proj (32x64) can have: 32"),
    ({"lora.target_modules": ["nosuch_proj"]}, "lora.target_modules", "no module named nosuch_proj"),
    ({"lora.target_modules": ["q_proj", "nosuch_proj"]}, "lora.target_modules", "no module named nosuch_proj"),
])
def test_lora_shape_checked_against_the_model_before_training(
    store: Store, tiny_base_path: Path, tiny_loaded: Any, two_tasks: dict[str, Path],
    extra: dict[str, object], key: str, words: str,
) -> None:
    with pytest.raises(ConfigError) as err:
        _train(store, tiny_base_path, tiny_loaded, two_tasks["sentiment"], **extra)
    text = str(err.value)
    assert f"{key}: {words}" in text
    if key == "lora.target_modules":  # the names the model does have
        assert "modules that can take a LoRA: " in text and "q_proj" in text and "down_proj" in text
    assert store.list() == [] and list((store.root / ".work" / "runs").iterdir()) == []  # nothing trained
    # the caller's model is left without LoRA layers
    assert not any("lora" in name for name, _ in tiny_loaded[0].named_modules())


def test_rank_at_the_limit_trains(store: Store, tiny_base_path: Path, tiny_loaded: Any, two_tasks) -> None:  # noqa: ANN001
    _train(store, tiny_base_path, tiny_loaded, two_tasks["sentiment"], **{"lora.r": 32, "train.max_steps": 1})
    assert store.get("sentiment").manifest.lora["r"] == 32


def test_cli_errors_name_the_key(tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]) -> None:
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    common = ["--registry", reg, "--task", "s", "--data", two_tasks["sentiment"], "--base-model", tiny_base_path]
    result = cli_run("train", *common, "--seed", "-1", *set_args(), ok=False)
    assert result.exit_code == 1 and "train.seed" in result.output and "Traceback" not in result.output
    result = cli_run("train", *common, *set_args(**{"lora.target_modules": ["nosuch_proj"]}), ok=False)
    assert result.exit_code == 1 and "lora.target_modules" in result.output and "q_proj" in result.output
    result = cli_run("train", *common, *set_args(**{"lora.r": 1000}), ok=False)
    assert result.exit_code == 1 and "lora.r" in result.output and "32" in result.output
    assert Store.open(reg).list() == []
    result = cli_run("eval", "--registry", reg, "--data", two_tasks["sentiment"], "--limit", "-3", ok=False)
    assert result.exit_code == 2 and "--limit" in result.output and "Traceback" not in result.output


def test_eval_set_limit_is_checked(two_tasks: dict[str, Path]) -> None:
    from cladapt.evaluation.scoring import load_eval_set

    with pytest.raises(ConfigError, match="limit: must be a positive number of rows, got -3"):
        load_eval_set(two_tasks["sentiment"], limit=-3)
    assert len(load_eval_set(two_tasks["sentiment"], limit=3).examples) == 3


def test_null_fields_in_json_rows_name_file_line_and_field(tmp_path: Path) -> None:
    from cladapt.data.rows import load_examples

    rows = task_rows("sentiment", 4)
    rows[2]["input"] = None
    rows[3]["output"] = None
    data = write_jsonl(tmp_path / "nulls.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples([data])
    text = str(err.value)
    assert f"{data}:3: field 'input' is null" in text and f"{data}:4: field 'output' is null" in text
    as_json = tmp_path / "nulls.json"
    as_json.write_text(json.dumps(rows[:3]))
    with pytest.raises(DataError, match=r"nulls\.json:3: field 'input' is null"):
        load_examples([as_json])


def test_empty_cells_of_a_table_are_still_empty_strings(tmp_path: Path) -> None:
    from cladapt.data.rows import load_examples

    csv = tmp_path / "rows.csv"
    csv.write_text("instruction,input,output\nsay yes,,yes\nsay no,please,no\n")
    assert [ex.input_text for ex in load_examples([csv]).examples] == ["", "please"]
