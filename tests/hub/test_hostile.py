"""Corrupted or hostile repos are refused with a clear error, and nothing reaches the registry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hub_helpers import BASE_ID

from cladapt.errors import Conflict, IntegrityError
from cladapt.registry import Store
from cladapt.registry.hub import pull, push

REPO = "org/reg"


@pytest.fixture
def pushed(hub_env: Any, src_store: Store) -> Any:
    push(src_store, REPO, base_model_id=BASE_ID)
    return hub_env


def _untouched(store: Store) -> None:
    assert store.list() == [] and store.get_policy() is None
    assert list((store.work_dir / "staging").iterdir()) == []  # no debris either


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda hub: hub.tamper(REPO, "sentiment__v2/adapter_model.safetensors"), "does not match its sha256"),
        (lambda hub: hub.tamper(REPO, "topics__v1/cladapt/sidecars/basis.safetensors", offset=100), "does not match its sha256"),
        (lambda hub: hub.put_raw(REPO, "sentiment__v1/adapter_model.bin", b"\x80\x04pickle"), "can hold pickles"),
        (lambda hub: hub.put_raw(REPO, "../escape.json", b"{}"), "bad component '..'"),
        (lambda hub: hub.put_raw(REPO, "topics__v1/cladapt/manifest.json", None), "missing from the repo"),
        (lambda hub: hub.put_raw(REPO, "topics__v1/cladapt/sidecars/extra.json", b"{}"), "not listed in cladapt-hub.json"),
        (lambda hub: hub.put_raw(REPO, "cladapt-hub.json", b"{not json"), "invalid cladapt-hub.json"),
    ],
    ids=["flipped-weight-byte", "flipped-sidecar-byte", "pickle", "dotdot-path", "missing-manifest", "unlisted-file", "bad-index"],
)
def test_damaged_repo_is_refused_and_nothing_imported(pushed: Any, tmp_path: Path, damage: Any, message: str) -> None:
    damage(pushed)
    dst = Store.init(tmp_path / "dst")
    with pytest.raises(IntegrityError, match=message) as err:
        pull(dst, REPO)
    assert "nothing" in (err.value.hint or "")
    _untouched(dst)


def test_consistent_forgery_of_file_and_index_is_caught_by_the_manifest(pushed: Any, tmp_path: Path) -> None:
    path = "topics__v1/adapter_model.safetensors"
    pushed.tamper(REPO, path)
    data = pushed.head_files(REPO)[path]
    index = json.loads(pushed.head_files(REPO)["cladapt-hub.json"])
    for version in index["versions"]:
        if path in version["files"]:
            version["files"][path]["sha256"] = hashlib.sha256(data).hexdigest()
    pushed.put_raw(REPO, "cladapt-hub.json", json.dumps(index).encode())
    dst = Store.init(tmp_path / "dst")
    with pytest.raises(IntegrityError, match="differs from the version's manifest"):
        pull(dst, REPO)
    _untouched(dst)


def test_interrupted_download_leaves_the_registry_as_it_was(pushed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cladapt.registry.hub_pull as hub_pull

    real = hub_pull.download
    calls = []

    def dying(api: Any, repo_id: str, revision: str, paths: list[str], into: Path) -> Path:
        calls.append(paths)
        if any(p.endswith(".safetensors") for p in paths):
            real(api, repo_id, revision, paths[: len(paths) // 2], into)  # half the files arrive, then the process dies
            raise KeyboardInterrupt
        return real(api, repo_id, revision, paths, into)

    monkeypatch.setattr(hub_pull, "download", dying)
    dst = Store.init(tmp_path / "dst")
    with pytest.raises(KeyboardInterrupt):
        pull(dst, REPO)
    _untouched(dst)
    monkeypatch.setattr(hub_pull, "download", real)
    assert len(pull(dst, REPO).imported) == 3


def test_a_commit_phase_failure_is_finished_by_the_next_pull(pushed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = Store.init(tmp_path / "dst")
    real = Store.commit
    count = {"n": 0}

    def failing(self: Store, *args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        if count["n"] == 2:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "commit", failing)
    with pytest.raises(OSError):
        pull(dst, REPO)
    assert [str(r.ref) for r in dst.list()] == ["sentiment@1"]  # each commit is atomic; no half version
    assert list((dst.work_dir / "staging").iterdir()) == []
    monkeypatch.setattr(Store, "commit", real)
    res = pull(dst, REPO)
    assert [v.action for v in sorted(res.versions, key=lambda v: v.remote)] == ["present", "imported", "imported"]
    assert dst.get("topics@1").parents == ("sentiment@2",)


def test_diverged_local_history_is_refused_or_appended(pushed: Any, tmp_path: Path, lora_template: Path, tiny_info: Any) -> None:
    from hub_helpers import add_version

    dst = Store.init(tmp_path / "dst")
    add_version(dst, lora_template, tiny_info, "sentiment", seed=42)  # a local sentiment@1 the repo does not have
    with pytest.raises(Conflict, match="sentiment: local sentiment@1 not in org/reg") as err:
        pull(dst, REPO)
    assert "--on-diverge append" in (err.value.hint or "")
    assert [str(r.ref) for r in dst.list()] == ["sentiment@1"]
    res = pull(dst, REPO, on_diverge="append")
    mapping = {v.remote: (v.local, v.status) for v in res.versions}
    assert mapping["sentiment@1"] == ("sentiment@2", "archived")
    assert mapping["sentiment@2"] == ("sentiment@3", "candidate")  # the local active version stays active
    assert mapping["topics@1"] == ("topics@1", "active")
    assert dst.get("sentiment").version == 1
    assert dst.get("sentiment@3").parents == ("sentiment@2",) and dst.get("topics@1").parents == ("sentiment@3",)
    assert any("diverged" in n for n in res.notes)
