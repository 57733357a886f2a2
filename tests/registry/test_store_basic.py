"""Store round trips: layout, opening, staging, commit, resolution of refs, listing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cladapt.errors import Conflict, IncompatibleBaseModel, NotFound, RegistryError
from cladapt.registry import AdapterRef, Manifest
from cladapt.registry.store import Store


def test_init_layout(store: Store) -> None:
    root = store.root
    assert json.loads((root / "cladapt-registry.json").read_text()) == {"format": 1}
    for name in ["index.sqlite", "audit.jsonl", "tasks", ".work/staging", ".work/runs", ".work/trash"]:
        assert (root / name).exists(), name
    assert store.list() == []
    assert store.tasks() == []
    assert [e["action"] for e in store.audit_log()] == ["init"]


def test_init_refuses_existing_or_non_empty(tmp_path: Path, store: Store) -> None:
    with pytest.raises(Conflict):
        Store.init(store.root)
    assert Store.init(store.root, exist_ok=True).root == store.root
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(RegistryError, match="not empty"):
        Store.init(tmp_path / "junk")


def test_open_missing_gives_hint(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        Store.open(tmp_path / "nope")
    assert "cladapt registry init" in (info.value.hint or "")


def test_open_newer_format_asks_to_upgrade(store: Store) -> None:
    (store.root / "cladapt-registry.json").write_text('{"format": 2}')
    with pytest.raises(RegistryError) as info:
        Store.open(store.root)
    assert not isinstance(info.value, NotFound)
    assert "upgrade" in (info.value.hint or "")


def test_open_recreates_deleted_work_dir(store: Store, commit) -> None:
    commit("amazon")
    import shutil

    shutil.rmtree(store.root / ".work")
    reopened = Store.open(store.root)
    assert [str(r.ref) for r in reopened.list()] == ["amazon@1"]
    assert (store.root / ".work" / "staging").is_dir()


def test_commit_round_trip(store: Store, commit) -> None:
    rec = commit("amazon", tensors=True)
    assert (rec.task, rec.version, rec.status) == ("amazon", 1, "active")
    assert (rec.method, rec.composition, rec.r, rec.alpha, rec.base_fingerprint) == ("lora", "route", 4, 8.0, "fp-base")
    assert rec.path == store.root / "tasks" / "amazon" / "v1"
    assert rec.peft_name == "amazon__v1"
    for sub in ["manifest.json", "adapter/adapter_config.json", "sidecars/router.json", "sidecars/basis.safetensors"]:
        assert (rec.path / sub).is_file(), sub
    on_disk = Manifest.model_validate_json((rec.path / "manifest.json").read_text())
    assert on_disk == rec.manifest
    assert {f.path for f in on_disk.files} == {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "sidecars/router.json",
        "sidecars/basis.safetensors",
    }
    assert on_disk.created.endswith("Z")
    status = json.loads((rec.path.parent / "status.json").read_text())
    assert status["versions"] == {"1": "active"}
    assert store.get("amazon") == rec
    assert store.list() == [rec]
    assert store.tasks() == ["amazon"]
    # Verified reads
    assert store.adapter_dir("amazon@1") == rec.path / "adapter"
    assert store.read_json("amazon", "router.json") == {"task": "amazon", "keys": [1, 2, 3]}
    assert store.read_json("amazon", "adapter/adapter_config.json")["task"] == "amazon"
    assert store.sidecar_path("amazon", "basis.safetensors") == rec.path / "sidecars" / "basis.safetensors"
    assert store.sidecar_path("amazon", "basis") == rec.path / "sidecars" / "basis.safetensors"
    tensors = store.read_tensors("amazon", "basis.safetensors")
    assert tensors["U"].shape == (2, 3)
    # The staging folder is gone from .work
    assert list((store.root / ".work" / "staging").iterdir()) == []


def test_get_resolution(store: Store, commit) -> None:
    commit("amazon")
    commit("amazon")
    commit("amazon", status="candidate")
    assert store.get("amazon").version == 2  # active
    assert store.get("amazon@active").version == 2
    assert store.get("amazon@latest").version == 3
    assert store.get(AdapterRef("amazon", 1)).status == "archived"
    assert store.active("amazon").version == 2
    store.set_status("amazon@2", "rejected", "bad")
    assert store.active("amazon") is None
    assert store.get("amazon").version == 3  # newest non-rejected
    store.set_status("amazon@3", "rejected", "bad")
    store.set_status("amazon@1", "rejected", "bad")
    with pytest.raises(NotFound):
        store.get("amazon")
    assert store.get("amazon@latest").version == 3


def test_not_found_hints(store: Store, commit) -> None:
    commit("amazon")
    with pytest.raises(NotFound) as info:
        store.get("amazon@7")
    assert "amazon@1" in (info.value.hint or "")
    with pytest.raises(NotFound) as info:
        store.get("amazn")
    assert "amazon" in (info.value.hint or "")
    assert store.active("yelp") is None
    assert store.list("yelp") == []


def test_list_filters_and_order(store: Store, commit) -> None:
    commit("yelp")
    commit("amazon")
    commit("amazon", status="rejected")
    commit("amazon", status="candidate")
    assert [str(r.ref) for r in store.list()] == ["amazon@1", "amazon@2", "amazon@3", "yelp@1"]
    assert [str(r.ref) for r in store.list(include_rejected=False)] == ["amazon@1", "amazon@3", "yelp@1"]
    assert [str(r.ref) for r in store.list("amazon")] == ["amazon@1", "amazon@2", "amazon@3"]
    assert store.tasks() == ["amazon", "yelp"]
    with pytest.raises(RegistryError):
        store.list("../x")


def test_base_fingerprint_check(store: Store, commit) -> None:
    commit("amazon")
    assert store.get("amazon", base_fingerprint="fp-base").version == 1
    with pytest.raises(IncompatibleBaseModel):
        store.get("amazon", base_fingerprint="other")


def test_parents_are_resolved_and_must_exist(store: Store, commit) -> None:
    commit("amazon")
    rec = commit("yelp", parents=("amazon",))
    assert rec.parents == ("amazon@1",)
    assert rec.manifest.parents == ["amazon@1"]
    with pytest.raises(NotFound):
        commit("dbpedia", parents=("amazon@9",))
    assert "dbpedia" not in store.tasks()


def test_versions_are_never_reused(store: Store, commit) -> None:
    commit("amazon")
    commit("amazon")
    store.remove("amazon@2")
    assert commit("amazon").version == 3


def test_staging_context_manager_discards(store: Store, fields) -> None:
    with store.stage("amazon") as staging:
        staging.write_json("x.json", {"a": 1})
        assert staging.dir.is_dir()
        assert staging.dir.parent == store.root / ".work" / "staging"
    assert not staging.dir.exists()
    with pytest.raises(ValueError), store.stage("amazon") as staging2:
        raise ValueError("training failed")
    assert not staging2.dir.exists()
    with store.stage("amazon") as staging3:
        (staging3.adapter_dir / "adapter_config.json").write_text("{}")
        staging3.manifest_fields = fields()
        rec = store.commit(staging3)
    assert rec.path.is_dir()  # committed: not discarded on exit
    with pytest.raises(RegistryError, match="already committed"):
        staging3.write_json("y.json", {})
    with pytest.raises(RegistryError):
        store.commit(staging3)
    assert store.list() == [rec]


def test_staging_paths_are_validated(store: Store) -> None:
    staging = store.stage("amazon")
    for bad in ["../escape.json", "/abs.json", "sidecars/../../x.json", "manifest.json/x", "evals/e.json"]:
        with pytest.raises(RegistryError):
            staging.write_json(bad, {})
    with pytest.raises(RegistryError):
        staging.write_json("bad.json", {"x": object()})
    with pytest.raises(RegistryError):
        staging.write_tensors("basis.pt", {})
    with pytest.raises(RegistryError):
        store.stage("bad/name")
    staging.discard()


def test_invalid_manifest_fields_are_all_reported(store: Store, fields) -> None:
    staging = store.stage("amazon")
    staging.manifest_fields = fields(lora={"r": 0, "alpha": "x"}, composition="mix")
    del staging.manifest_fields["seed"]
    with pytest.raises(RegistryError) as info:
        store.commit(staging)
    message = str(info.value)
    for key in ["seed", "lora", "composition"]:
        assert key in message
    staging.manifest_fields = fields(task="other")
    with pytest.raises(RegistryError, match="must not set"):
        store.commit(staging)
    staging.manifest_fields = fields(unknown_field=1)
    with pytest.raises(RegistryError, match="unknown_field"):
        store.commit(staging)
    staging.discard()
    assert store.list() == []


@pytest.mark.parametrize("name", ["adapter/adapter_model.bin", "sidecars/state.pt", "sidecars/x.pkl"])
def test_pickle_formats_are_refused(store: Store, fields, name: str) -> None:
    staging = store.stage("amazon")
    (staging.dir / name).write_bytes(b"pickle")
    staging.manifest_fields = fields()
    with pytest.raises(RegistryError, match="pickle"):
        store.commit(staging)
    assert store.list() == []


def test_symlinks_and_bad_names_are_refused(store: Store, fields, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    staging = store.stage("amazon")
    os.symlink(secret, staging.sidecar_dir / "link.json")
    (staging.sidecar_dir / ".hidden").write_text("x")
    staging.manifest_fields = fields()
    with pytest.raises(RegistryError) as info:
        store.commit(staging)
    assert "link.json" in str(info.value) and ".hidden" in str(info.value)


def test_commit_rejects_unknown_status(store: Store, fields) -> None:
    staging = store.stage("amazon")
    staging.manifest_fields = fields()
    with pytest.raises(RegistryError, match="unknown status"):
        store.commit(staging, status="live")


def test_manifest_rejects_newer_schema(store: Store, commit) -> None:
    rec = commit("amazon")
    raw = json.loads((rec.path / "manifest.json").read_text())
    raw["schema_version"] = 99
    with pytest.raises(Exception, match="newer"):
        Manifest.model_validate(raw)
