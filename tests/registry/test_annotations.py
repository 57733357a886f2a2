"""Mutable state beside the immutable versions: evaluations, the policy, and shared state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cladapt.errors import IntegrityError, NotFound, RegistryError
from cladapt.registry.store import Store


def test_evaluations_round_trip(store: Store, commit) -> None:
    rec = commit("amazon")
    assert store.evaluations("amazon") == {}
    store.add_evaluation("amazon@1", "amazon-test", {"exact_match": 0.8, "rows": 100})
    store.add_evaluation("amazon@1", "general", {"ppl": 12.5})
    store.add_evaluation("amazon@1", "amazon-test", {"exact_match": 0.9, "rows": 100})  # replaced
    assert store.evaluations("amazon") == {"amazon-test": {"exact_match": 0.9, "rows": 100}, "general": {"ppl": 12.5}}
    assert (rec.path / "evals" / "general.json").is_file()
    # Not part of the manifest, and verify is still clean.
    assert not any(f.path.startswith("evals/") for f in store.get("amazon").manifest.files)
    assert store.verify() == []
    assert [e["reason"] for e in store.audit_log() if e["action"] == "evaluate"] == ["amazon-test", "general", "amazon-test"]


def test_evaluation_validation(store: Store, commit) -> None:
    commit("amazon")
    for bad in ["../x", "a/b", "a.json", ""]:
        with pytest.raises(RegistryError):
            store.add_evaluation("amazon", bad, {})
    with pytest.raises(RegistryError):
        store.add_evaluation("amazon", "x", {"bad": object()})
    with pytest.raises(NotFound):
        store.add_evaluation("yelp", "x", {})


def test_policy(store: Store) -> None:
    assert store.get_policy() is None
    store.set_policy({"min_gain": 0.01, "max_forgetting": 0.02}, actor="admin")
    store.set_policy({"min_gain": 0.02})
    assert store.get_policy() == {"min_gain": 0.02}
    events = [e for e in store.audit_log() if e["action"] == "policy"]
    assert events[0]["from"] is None and events[0]["actor"] == "admin"
    assert events[1]["from"] == {"min_gain": 0.01, "max_forgetting": 0.02} and events[1]["to"] == {"min_gain": 0.02}
    with pytest.raises(RegistryError):
        store.set_policy(["not", "a", "dict"])  # type: ignore[arg-type]
    (store.root / "policy.json").write_text("[1]")
    with pytest.raises(IntegrityError):
        store.get_policy()


def _files(tmp_path: Path, **contents: bytes) -> dict[str, Path]:
    out = {}
    for name, data in contents.items():
        path = tmp_path / f"src-{name}"
        path.write_bytes(data)
        out[name.replace("_", ".")] = path
    return out


def test_shared_state_round_trip_and_integrity(store: Store, tmp_path: Path) -> None:
    key = "sha256-" + "ab" * 32
    assert store.read_shared("replay", key) is None
    assert store.shared_dir("replay", key) == store.root / "shared" / "replay" / key
    path = store.write_shared("replay", key, _files(tmp_path, stats_safetensors=b"abc", meta_json=b"{}"))
    assert path == store.shared_dir("replay", key)
    assert store.read_shared("replay", key) == path
    assert (path / "stats.safetensors").read_bytes() == b"abc"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"stats.safetensors", "meta.json"}
    # Replacing swaps the whole folder.
    store.write_shared("replay", key, _files(tmp_path, stats_safetensors=b"new"))
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "stats.safetensors"]
    assert (path / "stats.safetensors").read_bytes() == b"new"
    (path / "stats.safetensors").write_bytes(b"nex")
    with pytest.raises(IntegrityError, match="stats.safetensors"):
        store.read_shared("replay", key)
    (path / "stats.safetensors").write_bytes(b"new")
    (path / "extra.json").write_text("{}")
    with pytest.raises(IntegrityError, match="extra.json"):
        store.read_shared("replay", key)
    assert [e["action"] for e in store.audit_log()].count("write-shared") == 2


def test_shared_state_recovers_from_interrupted_replace(store: Store, tmp_path: Path) -> None:
    path = store.write_shared("replay", "k1", _files(tmp_path, a_json=b"{}"))
    backup = path.with_name(".k1.replaced")
    path.rename(backup)  # as if killed between "old aside" and "new into place"
    assert store.read_shared("replay", "k1") == backup
    store.write_shared("replay", "k1", _files(tmp_path, b_json=b"[]"))
    assert not backup.exists()
    assert sorted(p.name for p in path.iterdir()) == ["b.json", "manifest.json"]


def test_shared_names_are_validated(store: Store, tmp_path: Path) -> None:
    for kind, key in [("../x", "k"), ("replay", "../k"), ("a/b", "k"), ("replay", "a/b"), ("replay", "..")]:
        with pytest.raises(RegistryError):
            store.shared_dir(kind, key)
    src = tmp_path / "x"
    src.write_bytes(b"x")
    for name in ["../x", "manifest.json", "state.pt", ".hidden"]:
        with pytest.raises(RegistryError):
            store.write_shared("replay", "k", {name: src})
    assert store.read_shared("replay", "k") is None
    assert list((store.root / ".work" / "staging").iterdir()) == []


def test_run_dir_and_clean_work(store: Store) -> None:
    run = store.run_dir("amazon", "run-1")
    assert run.is_dir() and store.root / ".work" in run.parents
    staging = store.stage("amazon")
    assert store.clean_work(older_than_s=-1) == 0  # a live process's staging is claimed: kept
    staging.claim.release()  # what the kernel does when the process dies
    assert store.clean_work(older_than_s=3600) == 0  # younger than the cut-off
    assert store.clean_work(older_than_s=-1) == 1
    assert not staging.dir.exists()
    assert list((store.root / ".work" / "staging").iterdir()) == []  # the lock file went with it
