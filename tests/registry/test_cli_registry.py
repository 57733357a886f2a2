"""Registry commands refuse bad input with a clear message (no traceback) and never drop or
remove anything silently."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cladapt.cli import cli
from cladapt.errors import RegistryError
from cladapt.registry.store import Store


def run(*args: object, env: dict[str, str] | None = None, code: int = 0) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def test_rm_needs_an_explicit_version_and_asks_before_removing_the_active_one(store: Store, commit) -> None:
    commit("amazon")
    commit("amazon")
    out = run("rm", "--registry", store.root, "amazon", code=2)
    assert "explicit version" in out and "amazon@1" in out
    out = run("rm", "--registry", store.root, "amazon@2", code=2)  # active; stdin is not a terminal
    assert "--yes" in out
    assert [r.version for r in store.list()] == [1, 2]
    run("rm", "--registry", store.root, "amazon@1")  # archived: no question
    run("rm", "--registry", store.root, "amazon@2", "--yes")
    assert store.list() == []


def test_list_names_the_versions_it_cannot_show(store: Store, commit) -> None:
    commit("amazon")
    commit("amazon")
    path = store.root / "tasks/amazon/v2/manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99  # written by a newer cladapt
    path.write_text(json.dumps(manifest))
    status = json.loads((store.root / "tasks/amazon/status.json").read_text())
    status = {k: v for k, v in status.items() if k != "checksum"} | {"format": 1, "manifests": {}}
    status["generation"] += 1
    (store.root / "tasks/amazon/status.json").write_text(json.dumps(status))
    out = run("list", "--registry", store.root, "--json")
    assert "amazon@2 is not listed" in out and "newer than this cladapt" in out
    assert [p.where for p in store.unlisted()] == ["amazon@2"]


@pytest.mark.parametrize(
    "args",
    [("list", "--limit", "-1"), ("generate", "--max-new-tokens", "0", "hello")],
)
def test_out_of_range_options_are_usage_errors(store: Store, args: tuple[str, ...]) -> None:
    out = run(*args, "--registry", store.root, code=2)
    assert "Invalid value" in out


def test_bad_lock_timeout_is_a_clear_error(store: Store, commit) -> None:
    commit("amazon")
    out = run("registry", "verify", store.root, env={"CLADAPT_LOCK_TIMEOUT": "abc"}, code=1)
    assert "CLADAPT_LOCK_TIMEOUT='abc'" in out


def test_read_only_registry_is_a_clear_error(store: Store, commit, monkeypatch: pytest.MonkeyPatch) -> None:
    commit("amazon")
    commit("amazon")
    real_open = os.open
    lock = str(store.root / ".work/lock")

    def read_only(path, flags, *args):  # type: ignore[no-untyped-def]
        if str(path) == lock:
            raise OSError(errno.EROFS, "Read-only file system", lock)
        return real_open(path, flags, *args)

    monkeypatch.setattr("cladapt.registry.lock.os.open", read_only)
    assert "amazon" in run("list", "--registry", store.root)  # reading needs no lock
    for args in (("registry", "verify", store.root), ("rm", "--registry", store.root, "amazon@1"),
                 ("promote", "--registry", store.root, "amazon@1")):
        out = run(*args, code=1)
        assert "read-only" in out and "Read-only file system" in out
    assert [r.version for r in store.list()] == [1, 2]

    def no_mkdir(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr("cladapt.registry.staging.Path.mkdir", no_mkdir)
    with pytest.raises(RegistryError, match="read-only"):  # what `train` meets when it stages its version
        store.stage("amazon")


def test_hints_name_real_commands(store: Store, commit) -> None:
    commit("amazon")
    assert "`cladapt list`" in run("show", "--registry", store.root, "nosuchtask", code=1)
    (store.root / "policy.json").write_text("{broken")
    out = run("gate", "show", "--registry", store.root, code=1)
    assert "cladapt gate set" in out and "set_policy" not in out


def test_merged_export_names_what_it_leaves_out(store: Store, commit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = {"id": "other-model", "fingerprint": "fp-other", "tokenizer_fingerprint": "fp-tok"}
    commit("old", composition="sum", base_model=other)
    commit("new", composition="sum")
    seen: list[list[str]] = []

    def fake_write(store, recs, out, base_id):  # type: ignore[no-untyped-def]
        seen.append([str(r.ref) for r in recs])
        return {str(r.ref): 4 for r in recs}

    monkeypatch.setattr("cladapt.adapters.export.write_merged", fake_write)
    out = run("export", "--registry", store.root, "--merged", tmp_path / "out")
    assert seen == [["new@1"]]
    assert "left out old@1" in out and "another base model" in out
