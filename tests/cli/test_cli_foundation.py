"""The foundation through the CLI, as a user runs it, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_run, set_args, task_rows, write_jsonl

run = cli_run


def sets(**extra: object) -> list[str]:
    return set_args(**extra)


@pytest.fixture
def trained(tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]) -> Path:
    reg = tmp_path / "reg"
    run("registry", "init", reg)
    run("train", "--registry", reg, "--task", "sentiment", "--data", two_tasks["sentiment"],
        "--base-model", tiny_base_path, *sets())
    return reg


def test_train_list_show_verify(trained: Path, tiny_base_path: Path) -> None:
    rows = json.loads(run("list", "--registry", trained, "--json").output)
    assert [(r["task"], r["version"], r["status"], r["method"], r["r"]) for r in rows] == [
        ("sentiment", 1, "active", "lora", 4)
    ]
    assert rows[0]["base_model"] == str(tiny_base_path)
    shown = json.loads(run("show", "--registry", trained, "sentiment@1", "--json").output)
    paths = {f["path"] for f in shown["files"]}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= paths
    assert all(len(f["sha256"]) == 64 for f in shown["files"])
    assert shown["config"]["lora"]["r"] == 4 and shown["data"]["rows"] == 16
    assert shown["train_stats"]["steps"] == 3
    assert "registry OK" in run("registry", "verify", trained).output
    table = run("list", "--registry", trained).output
    assert "sentiment" in table and "active" in table


def test_export_matches_plain_peft_logits(trained: Path, tmp_path: Path, tiny_base_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    from cladapt.adapters.loading import attach
    from cladapt.base_model import load
    from cladapt.registry.store import Store

    out = tmp_path / "export"
    run("export", "--registry", trained, "sentiment", out)
    state = load_file(str(out / "adapter_model.safetensors"))
    # training moved lora_B away from its zero init, so the comparison below can fail
    assert max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k) > 1e-4
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    m1, _, info = load(str(tiny_base_path))
    plain = PeftModel.from_pretrained(m1, str(out)).eval()
    m2, _, _ = load(str(tiny_base_path))
    ours, _ = attach(m2, Store.open(trained), info, ["sentiment@1"])
    m3, _, _ = load(str(tiny_base_path))
    with torch.no_grad():
        a, b, base = plain(ids).logits, ours(ids).logits, m3(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float((a - base).abs().max()) > 1e-5  # the adapter changes the output


def test_generate_with_adapter_and_base(trained: Path) -> None:
    out = run("generate", "--registry", trained, "--adapter", "sentiment", "--max-new-tokens", "4",
              "the film was great").output
    assert "(sentiment@1)" in out and "the film was great" in out  # the version applied, explicit


def test_second_version_archives_first(trained: Path, two_tasks: dict[str, Path], tiny_base_path: Path) -> None:
    run("train", "--registry", trained, "--task", "sentiment", "--data", two_tasks["sentiment"],
        "--base-model", tiny_base_path, *sets())
    rows = json.loads(run("list", "--registry", trained, "--json").output)
    assert [(r["version"], r["status"]) for r in rows] == [(1, "archived"), (2, "active")]
    run("rm", "--registry", trained, "sentiment@1")
    rows = json.loads(run("list", "--registry", trained, "--json").output)
    assert [r["version"] for r in rows] == [2]


def test_bad_data_reports_every_row_and_writes_nothing(tmp_path: Path, tiny_base_path: Path) -> None:
    reg = tmp_path / "reg"
    run("registry", "init", reg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"instruction": "x", "input": "y", "output": "z"}) + "\n"
        + "{not json\n"
        + json.dumps({"instruction": "x", "input": "y", "output": ""}) + "\n"
        + json.dumps({"instruction": "x", "input": 3, "output": "z"}) + "\n"
        + json.dumps({"instruction": "x", "ouput": "z"}) + "\n"
    )
    result = run("train", "--registry", reg, "--task", "t", "--data", bad, "--base-model", tiny_base_path, ok=False)
    assert result.exit_code == 1
    err = result.output
    for line, what in ((2, "not valid JSON"), (3, "'output' is empty"), (4, "'input' must be a string"),
                       (5, "unknown field(s) ['ouput']")):
        assert f"{bad}:{line}" in err and what in err, (line, what, err)
    assert json.loads(run("list", "--registry", reg, "--json").output) == []


def test_bad_config_and_bad_task_name(tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]) -> None:
    reg = tmp_path / "reg"
    run("registry", "init", reg)
    result = run("train", "--registry", reg, "--task", "s", "--data", two_tasks["sentiment"],
                 "--set", "lora.alpah=4", ok=False)
    assert result.exit_code == 1 and "lora.alpah" in result.output and "did you mean 'alpha'" in result.output
    result = run("train", "--registry", reg, "--task", "../etc", "--data", two_tasks["sentiment"],
                 "--base-model", tiny_base_path, *sets(), ok=False)
    assert result.exit_code == 1 and "../etc" in result.output


def test_adapter_refused_on_another_base(trained: Path, tmp_path: Path) -> None:
    from tiny import build_tiny

    other = build_tiny(tmp_path / "other-base", seed=1)
    result = run("generate", "--registry", trained, "--adapter", "sentiment", "--base-model", other, "hi", ok=False)
    assert result.exit_code == 1
    assert "trained on base model" in result.output and "fingerprint" in result.output


def test_overlong_rows_rejected_or_truncated(tmp_path: Path, tiny_base_path: Path) -> None:
    reg = tmp_path / "reg"
    run("registry", "init", reg)
    rows = task_rows("sentiment", 8)
    rows[3]["input"] = "the film was great " * 200
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    result = run("train", "--registry", reg, "--task", "s", "--data", data, "--base-model", tiny_base_path,
                 *sets(), "--set", "train.max_length=64", "--set", "train.overlong=reject", ok=False)
    assert result.exit_code == 1 and f"{data}:4" in result.output and "max_length 64" in result.output
    run("train", "--registry", reg, "--task", "s", "--data", data, "--base-model", tiny_base_path,
        *sets(), "--set", "train.max_length=64")
    shown = json.loads(run("show", "--registry", reg, "s", "--json").output)
    assert shown["data"]["truncated"] == 1


def test_flipped_byte_is_detected(trained: Path) -> None:
    blob = next((trained / "tasks" / "sentiment").glob("v1/adapter/adapter_model.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = run("registry", "verify", trained, ok=False)
    assert result.exit_code == 1 and "adapter_model.safetensors" in result.output
    result = run("export", "--registry", trained, "sentiment", trained.parent / "x", ok=False)
    assert result.exit_code == 1 and "sha256" in result.output.lower()
