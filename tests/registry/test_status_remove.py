"""Status changes (audited, one active per task) and removal (refused while others depend on it)."""

from __future__ import annotations

import json

import pytest

from cladapt.errors import Conflict, NotFound, RegistryError
from cladapt.registry.store import Store


def test_set_status_is_audited_and_demotes_previous_active(store: Store, commit) -> None:
    commit("amazon")
    commit("amazon", status="candidate")
    rec = store.set_status("amazon@2", "active", "passed the gate", actor="gate")
    assert rec.status == "active"
    assert store.get("amazon@1").status == "archived"
    assert store.active("amazon").version == 2
    status_file = json.loads((store.root / "tasks/amazon/status.json").read_text())
    assert status_file["versions"] == {"1": "archived", "2": "active"}
    events = [e for e in store.audit_log() if e["action"] == "status"]
    assert {"ref": "amazon@2", "from": "candidate", "to": "active", "reason": "passed the gate", "actor": "gate"}.items() <= events[0].items()
    assert events[1]["ref"] == "amazon@1" and events[1]["to"] == "archived"
    for event in store.audit_log():
        assert {"time", "actor", "action", "ref", "from", "to", "reason"} <= event.keys()
    # Rollback
    store.set_status("amazon@1", "active", "rollback")
    assert store.active("amazon").version == 1
    assert store.get("amazon@2").status == "archived"
    assert store.verify() == []


def test_set_status_validation_and_noop(store: Store, commit) -> None:
    commit("amazon")
    with pytest.raises(RegistryError, match="unknown status"):
        store.set_status("amazon@1", "deployed", "x")
    with pytest.raises(NotFound):
        store.set_status("amazon@5", "rejected", "x")
    before = len(store.audit_log())
    assert store.set_status("amazon@1", "active", "again").status == "active"
    assert len(store.audit_log()) == before  # no change, no event


def test_audit_log_is_append_only_jsonl(store: Store, commit) -> None:
    commit("amazon")
    commit("amazon")
    store.set_status("amazon@1", "rejected", "worse")
    lines = (store.root / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["init", "commit", "commit", "status", "status"]
    # A torn last line (writer killed mid-append) is skipped by readers, and cut by the next append.
    with open(store.root / "audit.jsonl", "a") as fh:
        fh.write('{"time": "torn')
    assert len(store.audit_log()) == 5
    store.set_status("amazon@2", "candidate", "re-evaluate")
    actions = [e["action"] for e in store.audit_log()]
    assert actions[-1] == "status" and len(actions) == 6
    assert "torn" not in (store.root / "audit.jsonl").read_text()
    assert store.verify() == []
    # A damaged line in the middle is a problem verify names (JSON broken, or the hash chain).
    lines = (store.root / "audit.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"commit"', '"commiT"')
    (store.root / "audit.jsonl").write_text("".join(lines))
    assert [p.message for p in store.verify() if p.where == "audit.jsonl"] == [
        "line 3 does not match its hash chain (the line, or the one before it, was altered)"
    ]


def test_remove_refuses_with_dependants_then_force(store: Store, commit) -> None:
    commit("amazon")
    commit("yelp", parents=("amazon@1",))
    commit("dbpedia", parents=("amazon@1", "yelp@1"))
    with pytest.raises(Conflict) as info:
        store.remove("amazon@1")
    assert "yelp@1" in str(info.value) and "dbpedia@1" in str(info.value)
    assert store.get("amazon@1").path.is_dir()
    store.remove("dbpedia@1")  # a leaf: fine
    with pytest.raises(Conflict) as info:
        store.remove("amazon@1")
    assert "dbpedia" not in str(info.value)
    store.remove("amazon@1", force=True)
    assert [str(r.ref) for r in store.list()] == ["yelp@1"]
    assert not (store.root / "tasks/amazon/v1").exists()
    assert json.loads((store.root / "tasks/amazon/status.json").read_text())["versions"] == {}
    removes = [e for e in store.audit_log() if e["action"] == "remove"]
    assert [e["ref"] for e in removes] == ["dbpedia@1", "amazon@1"]
    assert "yelp@1" in removes[1]["reason"]
    assert list((store.root / ".work" / "trash").iterdir()) == []
    assert store.verify() == []
    with pytest.raises(NotFound):
        store.get("amazon@1")


def test_remove_needs_an_explicit_version(store: Store, commit) -> None:
    commit("amazon")
    with pytest.raises(RegistryError, match="explicit version"):
        store.remove("amazon")
    with pytest.raises(NotFound):
        store.remove("amazon@2")


def test_remove_active_leaves_fallback(store: Store, commit) -> None:
    commit("amazon")
    commit("amazon")
    store.remove("amazon@2")
    assert store.active("amazon") is None
    assert store.get("amazon").version == 1
