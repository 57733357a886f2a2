"""Reads that choose a version never trust the index alone (a damaged index row is not used).

The version is chosen from ``status.json``; the index row must carry a valid checksum and match the
version's own ``manifest.json``, whose sha256 ``status.json`` records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cladapt.errors import IntegrityError
from cladapt.registry.store import Store


def flip_in_file(path: Path, needle: bytes, offset: int = 0, bit: int = 1) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, f"{needle!r} not in {path}"
    data[at + offset] ^= bit
    path.write_bytes(bytes(data))


def test_flipped_status_byte_in_the_index_does_not_pick_the_archived_version(store: Store, commit) -> None:
    commit("amazon")
    second = commit("amazon")
    flip_in_file(store.root / "index.sqlite", b"active", offset=5)  # 'active' -> 'activd' in the v2 row
    assert store.get("amazon").version == second.version  # not amazon@1, the archived one
    assert store.active("amazon").version == second.version
    assert store.adapter_dir("amazon") == second.path / "adapter"
    assert {r.version: r.status for r in Store.open(store.root).list()} == {1: "archived", 2: "active"}
    assert store.verify() == []


def test_non_hex_digest_in_the_index_is_rebuilt_not_a_traceback(store: Store, commit) -> None:
    rec = commit("amazon")
    digest = rec.manifest.files[0].sha256.encode()
    flip_in_file(store.root / "index.sqlite", digest, offset=3, bit=0x40)  # a hex digit becomes a letter > 'f'
    assert [r.version for r in Store.open(store.root).list()] == [1]
    assert store.get("amazon").manifest == rec.manifest
    assert store.verify() == []


def test_changed_manifest_value_is_caught_by_its_recorded_sha256(store: Store, commit) -> None:
    commit("amazon", metrics={"acc": 0.5})
    path = store.root / "tasks/amazon/v1/manifest.json"
    path.write_text(path.read_text().replace('"acc": 0.5', '"acc": 0.7'))  # still valid JSON and schema
    with pytest.raises(IntegrityError, match="manifest.json does not match the sha256"):
        store.get("amazon")
    problems = store.verify(reindex=True)
    assert [(p.where, "sha256 recorded in status.json" in p.message) for p in problems] == [("amazon@1", True)]
    assert store.list() == []  # not listed with the wrong metric ...
    assert [p.where for p in store.unlisted()] == ["amazon@1"]  # ... and not silently dropped


def test_non_hex_digest_in_a_manifest_is_a_clear_error(store: Store, commit) -> None:
    rec = commit("amazon")
    path = store.root / "tasks/amazon/v1/manifest.json"
    status_path = store.root / "tasks/amazon/status.json"
    status = json.loads(status_path.read_text())
    # an edit that also updated the recorded sha256: the manifest itself must still validate
    path.write_text(path.read_text().replace(rec.manifest.files[0].sha256, "g" * 64))
    status.pop("checksum")
    status["format"] = 1
    status["manifests"] = {}
    status["generation"] += 1
    status_path.write_text(json.dumps(status))
    with pytest.raises(IntegrityError, match="invalid manifest"):
        store.get("amazon@1")
    assert any("invalid manifest" in p.message for p in store.verify())


def test_a_damaged_row_is_never_rewritten_with_a_fresh_checksum(store: Store, commit) -> None:
    import sqlite3

    commit("amazon")
    commit("amazon")
    with sqlite3.connect(store.root / "index.sqlite") as conn:  # damage the row promote will demote
        conn.execute("UPDATE versions SET method='lorb' WHERE version=2")
    conn.close()
    store.set_status("amazon@1", "active", "promote")
    assert [(r.version, r.status, r.method) for r in store.list()] == [(1, "active", "lora"), (2, "archived", "lora")]
    assert store.verify() == []
