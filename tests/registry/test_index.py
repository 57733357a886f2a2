"""The SQLite index: derived, rebuilt when missing/corrupt/stale, and correct on 10,000 versions."""

from __future__ import annotations

import json
import shutil

from cladapt.registry.store import Store


def test_listing_10k_versions(store: Store, synth_versions) -> None:
    # timing is measured by bench/registry_scale.py, not asserted here
    synth_versions(store, 100, 100)
    reopened = Store.open(store.root)
    records = reopened.list()
    assert len(records) == 10_000
    assert len(reopened.list("task042")) == 100
    assert reopened.get("task042").version == 100
    assert len(reopened.list(include_rejected=False)) == 9_100  # v10, v20 .. v90 of each task are rejected
    assert len(reopened.tasks()) == 100


def test_deleted_or_corrupt_index_is_rebuilt(store: Store, commit) -> None:
    commit("amazon")
    commit("yelp", parents=("amazon@1",))
    expected = store.list()
    (store.root / "index.sqlite").unlink()
    assert Store.open(store.root).list() == expected
    (store.root / "index.sqlite").write_bytes(b"this is not a database" * 100)
    reopened = Store.open(store.root)
    assert reopened.list() == expected
    assert reopened._index.dependants("amazon", 1) == ["yelp@1"]
    assert reopened.verify() == []


def test_external_status_edit_is_picked_up(store: Store, commit) -> None:
    """A hand edit in the old, checksum-less format is read; one that breaks the checksum is not trusted."""
    commit("amazon")
    path = store.root / "tasks/amazon/status.json"
    original = json.loads(path.read_text())
    edited = {k: v for k, v in original.items() if k != "checksum"} | {"format": 1}
    edited["versions"] = {"1": "rejected"}
    edited["generation"] += 1
    path.write_text(json.dumps(edited))
    assert store.get("amazon@1").status == "rejected"
    status = dict(original)
    status["versions"] = {"1": "candidate"}  # an edit that leaves the old checksum in place
    status["generation"] += 2
    status["generation"] += 1
    path.write_text(json.dumps(status))
    assert store.get("amazon@1").status == "rejected"  # rebuilt from the index, not the damaged file
    assert any(e["action"] == "recover" for e in store.audit_log())


def test_tampered_index_row_is_never_returned(store: Store, commit) -> None:
    commit("amazon")
    import sqlite3

    with sqlite3.connect(store.root / "index.sqlite") as conn:
        conn.execute("UPDATE versions SET method='tampered'")
    conn.close()
    assert [r.method for r in store.list()] == ["lora"]  # the row checksum fails: rebuilt, not trusted
    with sqlite3.connect(store.root / "index.sqlite") as conn:
        conn.execute("UPDATE versions SET method='tampered'")
    conn.close()
    assert store.get("amazon").method == "lora"
    assert store.verify() == []


def test_version_removed_behind_our_back(store: Store, commit) -> None:
    """A remove killed after moving the folder to the trash: the status entry is dropped."""
    commit("amazon")
    commit("amazon")
    shutil.move(str(store.root / "tasks/amazon/v2"), str(store.root / ".work/trash/v2"))
    assert [str(r.ref) for r in store.list()] == ["amazon@1"]
    assert json.loads((store.root / "tasks/amazon/status.json").read_text())["versions"] == {"1": "archived"}
    assert store.verify() == []
    assert commit("amazon").version == 3  # the number is not reused


def test_unreadable_status_file_is_rebuilt_from_index(store: Store, commit) -> None:
    commit("amazon")
    commit("amazon", status="candidate")
    (store.root / "tasks/amazon/status.json").write_text("{torn")
    problems = store.verify()
    assert any("status.json" in p.where for p in problems)
    assert {r.version: r.status for r in store.list()} == {1: "active", 2: "candidate"}
    assert store.verify() == []
    assert any(e["action"] == "recover" for e in store.audit_log())


def test_readers_never_see_a_half_built_index(store: Store, synth_versions) -> None:
    """verify(reindex=True) builds the new index aside and swaps it in: lock-free readers keep working."""
    import threading

    synth_versions(store, 5, 40)
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        reader = Store.open(store.root)
        while not stop.is_set():
            try:
                seen.append(len(reader.list()))
            except BaseException as exc:  # surfaced below
                errors.append(exc)
                return

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for _ in range(5):
            assert store.verify(reindex=True) == []
    finally:
        stop.set()
        thread.join(30)
    assert errors == []
    assert seen and set(seen) == {200}


def test_index_deleted_while_open_is_rebuilt(store: Store, commit) -> None:
    commit("amazon")
    (store.root / "index.sqlite").unlink()
    assert [str(r.ref) for r in store.list()] == ["amazon@1"]
    (store.root / "index.sqlite").write_bytes(b"garbage" * 1000)
    assert store.get("amazon").version == 1
    assert store.verify() == []
