"""`cladapt export` exactly as the README and `--help` print it."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli_run, set_args
from safetensors.torch import load_file

run = cli_run


def test_export_merged_takes_out_as_its_only_argument(
    tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]
) -> None:
    reg = tmp_path / "reg"
    run("registry", "init", reg)
    for task, data in two_tasks.items():
        run("train", "--registry", reg, "--task", task, "--data", data, "--base-model", tiny_base_path,
            "--method", "inc-lora", *set_args())
    out = tmp_path / "merged"
    result = run("export", "--registry", reg, "--merged", out)
    assert "as one LoRA of rank 8" in result.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    state = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.shape[0] == 8 for k, t in state.items() if "lora_A" in k)


def test_export_usage_errors_name_the_fix(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    run("registry", "init", reg)
    result = run("export", "--registry", reg, "only-one-arg", ok=False)
    assert result.exit_code == 2 and "REF" in result.output and "OUT" in result.output
    result = run("show", "--registry", reg, "nosuch", ok=False)
    assert "registry list" not in result.output
