"""``--registry PATH`` never creates a registry by accident.

A typo in ``--registry`` used to start a fresh empty registry on ``train`` (and train into it), so
the real registry looked untouched. A named path without a registry is now an error naming it and
``cladapt registry init PATH``; the default registry ($CLADAPT_REGISTRY, else ./.cladapt) is still
created on first use, as the README's quick start says, and ``pull`` still fills a new folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli_run, set_args

from cladapt.cli.common import open_store
from cladapt.errors import NotFound


def test_open_store_creates_only_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLADAPT_REGISTRY", str(tmp_path / "default"))
    assert open_store(None, create=True).root == tmp_path / "default"
    assert (tmp_path / "default" / "cladapt-registry.json").is_file()
    with pytest.raises(NotFound) as err:
        open_store(tmp_path / "typo", create=True)
    assert str(tmp_path / "typo") in err.value.message and f"cladapt registry init {tmp_path / 'typo'}" in err.value.hint
    assert not (tmp_path / "typo").exists()
    assert open_store(tmp_path / "new", create=True, create_named=True).list() == []  # what pull asks for


def test_train_and_replay_init_refuse_a_missing_named_registry(
    tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]
) -> None:
    real = tmp_path / "reg"
    cli_run("registry", "init", real)
    typo = tmp_path / "rge"
    result = cli_run("train", "--registry", typo, "--task", "s", "--data", two_tasks["sentiment"],
                     "--base-model", tiny_base_path, *set_args(), ok=False)
    assert result.exit_code == 1 and f"no cladapt registry at {typo}" in result.output
    assert f"cladapt registry init {typo}" in result.output
    assert not typo.exists()
    result = cli_run("replay", "init", "--registry", typo, "--base-model", tiny_base_path, "--self-generate", "2",
                     ok=False)
    assert result.exit_code == 1 and "cladapt registry init" in result.output and not typo.exists()


def test_default_registry_is_created_on_first_train(
    tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLADAPT_REGISTRY", str(tmp_path / "default"))
    cli_run("train", "--task", "s", "--data", two_tasks["sentiment"], "--base-model", tiny_base_path,
            *set_args(**{"train.max_steps": 1}))
    assert [r.version for r in open_store(None).list("s")] == [1]
