"""Planted symbolic links never make the registry write (or read state) outside itself.

Every file the registry writes is opened with O_NOFOLLOW or replaced by rename, every folder it
writes into is checked for links below the root, ``tasks/<link>`` is never adopted as a task, and
``registry verify`` reports every link.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from cladapt.errors import CladaptError, RegistryError
from cladapt.registry.store import Store


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim.txt").write_text("precious\n")
    return folder


def test_lock_link_is_refused_and_its_target_untouched(store: Store, commit, outside: Path) -> None:
    commit("amazon")
    lock = store.root / ".work/lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(outside / "victim.txt")
    before = digest(outside)
    for action in (store.verify, lambda: commit("amazon"), lambda: store.set_status("amazon@1", "rejected", "x")):
        with pytest.raises(RegistryError, match="symbolic link"):
            action()
    assert digest(outside) == before
    lock.unlink()
    assert store.verify() == []


def test_audit_log_link_is_refused_before_any_change(store: Store, commit, outside: Path) -> None:
    commit("amazon")
    audit = store.root / "audit.jsonl"
    shutil.copy(audit, outside / "audit.jsonl")
    audit.unlink()
    audit.symlink_to(outside / "audit.jsonl")
    before = digest(outside)
    with pytest.raises(RegistryError, match="symbolic link"):
        commit("amazon")
    with pytest.raises(RegistryError, match="symbolic link"):
        store.add_evaluation("amazon@1", "e", {"acc": 1.0})
    assert digest(outside) == before
    assert [r.version for r in store.list()] == [1]  # nothing half-done
    assert any(p.where == "audit.jsonl" and "symbolic link" in p.message for p in store.verify_report().problems)


def test_task_link_is_not_adopted_and_nothing_is_written_into_it(
    store: Store, commit, fields, outside: Path, tmp_path: Path
) -> None:
    commit("amazon")
    other = Store.init(tmp_path / "other")
    staging = other.stage("foreign")
    (staging.adapter_dir / "adapter_config.json").write_text("{}")
    staging.manifest_fields = fields()
    other.commit(staging)
    foreign = outside / "foreign"
    shutil.copytree(other.root / "tasks/foreign", foreign)
    (store.root / "tasks/foreign").symlink_to(foreign)
    before = digest(outside)
    reopened = Store.open(store.root)
    assert [str(r.ref) for r in reopened.list()] == ["amazon@1"]
    assert reopened.tasks() == ["amazon"]
    with pytest.raises(RegistryError, match="symbolic link"):
        reopened.get("foreign")
    with pytest.raises(CladaptError):
        reopened.add_evaluation("foreign@1", "e", {"acc": 1.0})
    problems = reopened.verify()
    assert any(p.where == "tasks/foreign" and "symbolic link" in p.message for p in problems)
    assert digest(outside) == before  # no status.json, no evals written into the outside folder


def test_links_inside_a_version_and_elsewhere_are_refused(store: Store, commit, outside: Path) -> None:
    rec = commit("amazon")
    shutil.copytree(rec.path / "adapter", outside / "adapter")
    shutil.rmtree(rec.path / "adapter")
    (rec.path / "adapter").symlink_to(outside / "adapter")
    (outside / "evals").mkdir()
    (rec.path / "evals").symlink_to(outside / "evals")
    (outside / "shared").mkdir()
    (store.root / "shared/gere").symlink_to(outside / "shared")
    before = digest(outside)
    with pytest.raises(CladaptError):
        store.adapter_dir("amazon@1")
    with pytest.raises(RegistryError, match="symbolic link"):
        store.add_evaluation("amazon@1", "e", {"acc": 1.0})
    with pytest.raises(RegistryError, match="symbolic link"):
        store.write_shared("gere", "k", {"a.json": outside / "victim.txt"})
    where = {p.where for p in store.verify()}
    assert {"tasks/amazon/v1/adapter", "tasks/amazon/v1/evals", "shared/gere"} <= where
    assert digest(outside) == before


def test_work_and_index_links(store: Store, commit, outside: Path) -> None:
    commit("amazon")
    shutil.rmtree(store.root / ".work/staging")
    (store.root / ".work/staging").symlink_to(outside)
    with pytest.raises(RegistryError, match="symbolic link"):
        store.stage("amazon")
    (store.root / ".work/staging").unlink()
    index = store.root / "index.sqlite"
    shutil.copy(index, outside / "index.sqlite")
    index.unlink()
    index.symlink_to(outside / "index.sqlite")
    (store.root / "index.sqlite-journal").symlink_to(outside / "victim.txt")
    before = digest(outside)
    reopened = Store.open(store.root)  # the links are replaced by a rebuilt index, never written through
    assert [r.version for r in reopened.list()] == [1]
    assert commit("amazon").version == 2
    assert not index.is_symlink() and not (store.root / "index.sqlite-journal").exists()
    assert digest(outside) == before
    assert reopened.verify() == []
