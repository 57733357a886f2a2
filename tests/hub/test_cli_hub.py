"""`cladapt push` / `cladapt pull` exactly as the README shows them, against the fake Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hub_helpers import BASE_ID, random_lora

from cladapt.registry import Store


def run(*args: object, ok: bool = True) -> Any:
    from click.testing import CliRunner

    from cladapt.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_readme_push_and_pull_commands(hub_env: Any, src_store: Store, tmp_path: Path, lora_template: Path, tiny_base_path: Path) -> None:
    reg, ids = src_store.root, ["--base-model-id", BASE_ID]  # the tiny base is a local folder, so it needs its Hub id
    out = run("push", "sentiment@2", "--repo", "org/cladapt-sentiment", "--tag", "v2", "--registry", reg, *ids).output
    assert "pushed 1 version(s) -> org/cladapt-sentiment@main" in out and "tagged v2" in out
    assert "adapter_model.safetensors" in hub_env.head_files("org/cladapt-sentiment")

    dry = run("push", "--all", "--repo", "org/support-adapters", "--dry-run", "--registry", reg, *ids).output
    assert "would upload topics__v1/adapter_model.safetensors" in dry and "org/support-adapters" not in hub_env.repos
    out = run("push", "--all", "--repo", "org/support-adapters", "--private", "--registry", reg, *ids).output
    assert "pushed 3 version(s)" in out and hub_env.repos["org/support-adapters"].private
    again = json.loads(run("push", "--all", "--repo", "org/support-adapters", "--registry", reg, *ids, "--json").stdout)
    assert again["uploads"] == [] and again["unchanged"] > 0

    new = tmp_path / "reg2"
    out = run("pull", "org/support-adapters", "--registry", new, "--task", "topics").output
    assert "imported topics@1 -> topics@1" in out and "3 imported" in out
    out = run("pull", "org/cladapt-sentiment", "--registry", new, "--revision", "v2").output
    assert "present sentiment@2 -> sentiment@2" in out and "0 imported" in out

    random_lora(lora_template, tmp_path / "plain", seed=11, base_id=BASE_ID)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_env.url, token=hub_env.token)
    api.create_repo("some-user/plain-peft-lora")
    api.upload_folder(repo_id="some-user/plain-peft-lora", folder_path=tmp_path / "plain")
    out = run("pull", "some-user/plain-peft-lora", "--task", "legal", "--registry", new,
              "--base-model", tiny_base_path, *ids).output
    assert "imported some-user/plain-peft-lora@" in out and "legal@1 (active)" in out
    assert [str(r.ref) for r in Store.open(new).list()] == ["legal@1", "sentiment@1", "sentiment@2", "topics@1"]


def test_cli_errors_are_clear(hub_env: Any, src_store: Store, tmp_path: Path) -> None:
    result = run("push", "--repo", "org/x", "--registry", src_store.root, ok=False)
    assert result.exit_code == 2 and "either a REF" in result.output
    result = run("push", "--all", "--repo", "org/x", "--registry", src_store.root, ok=False)
    assert result.exit_code == 1 and "has no Hub id" in result.output and "--base-model-id" in result.output
    result = run("pull", "org/nothing-here", "--registry", tmp_path / "r", ok=False)
    assert result.exit_code == 1 and "was not found" in result.output


def test_offline_mode_is_named(src_store: Store, monkeypatch: Any) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run("push", "--all", "--repo", "org/x", "--registry", src_store.root, "--base-model-id", BASE_ID, ok=False)
    assert result.exit_code == 2 and "HF_HUB_OFFLINE" in result.output


def test_token_from_the_login_cache(hub_env: Any, src_store: Store, tmp_path: Path, monkeypatch: Any) -> None:
    from huggingface_hub import constants

    token_file = tmp_path / "hf-home" / "token"  # where `hf auth login` writes it
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(hub_env.token)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("HF_TOKEN")
    run("push", "sentiment@1", "--repo", "org/from-cache", "--registry", src_store.root, "--base-model-id", BASE_ID)
    assert "org/from-cache" in hub_env.repos
    token_file.write_text("hf_wrong")
    result = run("push", "sentiment@1", "--repo", "org/other", "--registry", src_store.root, "--base-model-id", BASE_ID, ok=False)
    assert result.exit_code == 1 and "refused the credentials" in result.output and "org/other" not in hub_env.repos
