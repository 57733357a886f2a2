"""The config system: resolution order, provenance, and errors that name the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cladapt.config import RunConfig, config_from_manifest, load_config
from cladapt.errors import ConfigError


def test_defaults_and_method_preset() -> None:
    cfg, prov = load_config()
    assert cfg.method.name == "lora"
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert prov["lora.r"] == "preset:default"


def test_resolution_order_user_file_then_set(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("lora: {r: 4}\ntrain: {learning_rate: 5.0e-4}\n")
    cfg, prov = load_config(files=[str(f)], overrides=["lora.r=16", "lora.target_modules=[q_proj,k_proj]"])
    assert cfg.lora.r == 16  # --set beats the file
    assert cfg.train.learning_rate == pytest.approx(5e-4)  # the file beats the default preset
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert prov["lora.r"] == "--set lora.r=16"
    assert prov["train.learning_rate"] == str(f)


def test_train_preset_by_name() -> None:
    cfg, prov = load_config(files=["cpu-small"])
    assert cfg.train.max_length == 256
    assert prov["train.max_length"] == "preset:cpu-small"


def test_all_errors_reported_together_with_source_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train: {learning_rate: high, epochz: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(files=[str(f)], overrides=["lora.rr=3"])
    msg = str(info.value)
    assert f"{f}: train.learning_rate" in msg
    assert "epochz" in msg and "did you mean 'epochs'" in msg
    assert "--set lora.rr=3: lora.rr" in msg and "did you mean 'r'" in msg
    assert len(info.value.issues) == 3


def test_unknown_method_suggests_a_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        load_config(method="lorra")


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(files=[str(f), str(tmp_path / "nope.yaml")])
    assert "not valid YAML" in str(info.value) and "config file not found" in str(info.value)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["lora.r"])


def test_round_trip_through_manifest_dict() -> None:
    cfg, _ = load_config(overrides=["lora.r=4"])
    again = config_from_manifest(cfg.model_dump(mode="json"))
    assert isinstance(again, RunConfig) and again == cfg


def test_configs_never_execute_code(tmp_path: Path) -> None:
    f = tmp_path / "evil.yaml"
    f.write_text("train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(files=[str(f)])


def test_zero3_refused_for_methods_that_need_whole_matrices(tmp_path: Path) -> None:
    import json

    from cladapt.adapters import METHODS
    from cladapt.errors import CladaptError
    from cladapt.train.trainer_setup import check_zero3

    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg, _ = load_config(method="olora", overrides=[f"train.deepspeed={ds}"])
    with pytest.raises(CladaptError, match="ZeRO-3"):
        check_zero3(cfg, METHODS.get("olora"))
    cfg, _ = load_config(method="lora", overrides=[f"train.deepspeed={ds}"])
    check_zero3(cfg, METHODS.get("lora"))  # supports_zero3: accepted
