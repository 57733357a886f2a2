"""A process killed inside an index transaction never makes the index lie or break.

The index is disposable: a journal-bearing or damaged index is rebuilt from the manifests together
with its journal, never replayed into a rebuilt file and never trusted. The kills come from a raw
SQLite writer killed before COMMIT (with its changed pages already spilled into the file) and from
the store's own ``in_index`` crash points of commit, promote and remove.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cladapt.registry.store import Store

pytestmark = pytest.mark.multiprocess


def run_worker(worker: Path, *args: object, crash_at: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "CLADAPT_TEST_CRASH_AT"}
    if crash_at:
        env["CLADAPT_TEST_CRASH_AT"] = crash_at
    proc = subprocess.run([sys.executable, str(worker), *map(str, args)], env=env, capture_output=True, timeout=120)
    return proc.returncode


def truth(store: Store) -> dict[str, tuple[str, str, str]]:
    return {str(r.ref): (r.status, r.method, r.created) for r in store.list()}


def test_kill_inside_an_index_transaction_is_rebuilt_not_replayed(store: Store, commit, worker: Path) -> None:
    for task in ("amazon", "amazon", "yelp", "dbpedia", "agnews"):
        commit(task, method_config={"pad": "x" * 3000})  # rows big enough to spill pages
    expected = truth(store)
    assert run_worker(worker, "--index-txn", store.root) == -signal.SIGKILL
    assert (store.root / "index.sqlite-journal").exists()
    for opened in (Store.open(store.root), store):  # a fresh process, and one opened before the kill
        assert truth(opened) == expected
        active = opened.get("amazon")
        assert (active.version, active.status) == (2, "active")
        assert active.manifest == opened.get("amazon@2").manifest
    assert not (store.root / "index.sqlite-journal").exists()
    assert store.verify() == []
    assert commit("amazon").version == 3


@pytest.mark.parametrize("op", ["commit", "promote", "rm"])
def test_kill_at_the_in_index_crash_point(store: Store, commit, worker: Path, op: str) -> None:
    commit("amazon")
    commit("amazon", status="candidate")
    commit("yelp")
    args = {
        "commit": (store.root, "amazon", 1),
        "promote": ("--promote", store.root, "amazon@2"),
        "rm": ("--rm", store.root, "amazon@2"),
    }[op]
    point = {"commit": "in_index", "promote": "status:in_index", "rm": "remove:in_index"}[op]
    assert run_worker(worker, *args, crash_at=point) == -signal.SIGKILL
    reopened = Store.open(store.root)
    expected = {
        "commit": {"amazon@1": "archived", "amazon@2": "candidate", "amazon@3": "active", "yelp@1": "active"},
        "promote": {"amazon@1": "archived", "amazon@2": "active", "yelp@1": "active"},
        "rm": {"amazon@1": "active", "yelp@1": "active"},
    }[op]
    assert {str(r.ref): r.status for r in reopened.list()} == expected
    assert not (store.root / "index.sqlite-journal").exists()
    assert reopened.verify() == []
    # The change reached status.json before the kill, so its audit event is there too (owed, then paid).
    actions = [(e["action"], e["ref"]) for e in reopened.audit_log()]
    wanted = {"commit": ("commit", "amazon@3"), "promote": ("status", "amazon@2"), "rm": ("remove", "amazon@2")}[op]
    assert actions.count(wanted) == (1 if op != "promote" else 1)
