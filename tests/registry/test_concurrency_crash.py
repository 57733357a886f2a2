"""Concurrent commits from several processes all land; a process killed mid-commit loses nothing.

Crash points come from the ``CLADAPT_TEST_CRASH_AT`` seam in ``Store.commit``, which SIGKILLs the
committing process at that exact step.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cladapt.registry.store import Store

pytestmark = pytest.mark.multiprocess


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder of the registry state (everything but .work), with file contents."""
    state: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == ".work":
            continue
        state[rel.as_posix()] = path.read_bytes() if path.is_file() else None
    return state


def run_worker(worker: Path, root: Path, task: str, crash_at: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "CLADAPT_TEST_CRASH_AT"}
    if crash_at:
        env["CLADAPT_TEST_CRASH_AT"] = crash_at
    proc = subprocess.run([sys.executable, str(worker), str(root), task, "1"], env=env, capture_output=True, timeout=120)
    return proc.returncode


def test_concurrent_commits_all_land(store: Store, commit, worker: Path) -> None:
    commit("amazon")
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [
        ctx.Process(target=runpy.run_path, args=(str(worker), {"ARGV": [str(store.root), "amazon", "3"], "GO": go}, "__main__"))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    go.set()
    for proc in procs:
        proc.join(180)
        assert proc.exitcode == 0
    records = store.list("amazon")
    assert [r.version for r in records] == list(range(1, 14))
    assert [r.status for r in records].count("active") == 1
    assert records[-1].status == "active"
    assert len({r.manifest.files[1].sha256 for r in records[1:]}) == 12  # 12 distinct adapters
    assert [e["action"] for e in store.audit_log()].count("commit") == 13
    assert store.verify() == []


def test_concurrent_commits_to_new_task(store: Store, worker: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [
        ctx.Process(target=runpy.run_path, args=(str(worker), {"ARGV": [str(store.root), "fresh", "1"], "GO": go}, "__main__"))
        for _ in range(3)
    ]
    for proc in procs:
        proc.start()
    go.set()
    for proc in procs:
        proc.join(180)
        assert proc.exitcode == 0
    assert [r.version for r in store.list("fresh")] == [1, 2, 3]
    assert store.verify() == []


@pytest.mark.parametrize("task", ["amazon", "newtask"])
@pytest.mark.parametrize("crash_at", ["after_manifest", "before_rename"])
def test_kill_before_rename_leaves_no_trace(store: Store, commit, worker: Path, task: str, crash_at: str) -> None:
    commit("amazon")
    before = snapshot(store.root)
    assert run_worker(worker, store.root, task, crash_at) == -signal.SIGKILL
    assert snapshot(store.root) == before
    reopened = Store.open(store.root)
    assert snapshot(store.root) == before
    assert [str(r.ref) for r in reopened.list()] == ["amazon@1"]
    assert reopened.verify() == []
    # The lock died with the process: the next commit goes through.
    assert commit(task).version == (2 if task == "amazon" else 1)


@pytest.mark.parametrize("task", ["amazon", "newtask"])
@pytest.mark.parametrize(
    ("crash_at", "new_status"),
    [("after_rename", "candidate"), ("after_status", "active"), ("in_index", "active"), ("after_index", "active"),
     ("after_audit", "active")],
)
def test_kill_after_rename_is_repaired(store: Store, commit, worker: Path, task: str, crash_at: str, new_status: str) -> None:
    first = commit("amazon")
    assert run_worker(worker, store.root, task, crash_at) == -signal.SIGKILL
    new_version = 2 if task == "amazon" else 1
    # A store opened *before* the crash notices on its next call ...
    assert store.verify() == []
    versions = {str(r.ref): r.status for r in store.list()}
    assert versions[f"{task}@{new_version}"] == new_status
    # ... and nothing committed earlier is lost.
    assert store.adapter_dir("amazon@1") == first.path / "adapter"
    expected_first = "archived" if (task == "amazon" and new_status == "active") else "active"
    assert versions["amazon@1"] == expected_first
    assert len(store.list()) == 2
    if crash_at == "after_rename":
        # A half-finished commit is never silently made active; the repair is audited.
        assert any(e["action"] == "recover" for e in store.audit_log())
    else:
        # The commit reached status.json, so its audit event is written exactly once: the next
        # open pays what the killed process owed, and never writes it twice.
        commits = [e["ref"] for e in store.audit_log() if e["action"] == "commit"]
        assert commits.count(f"{task}@{new_version}") == 1
        assert (store.root / "tasks" / task / "status.json").read_text().count('"owed_audit": []') == 1
    reopened = Store.open(store.root)
    assert {str(r.ref): r.status for r in reopened.list()} == versions
    assert commit(task).version == new_version + 1


def test_fresh_open_repairs_after_rename_crash(store: Store, commit, worker: Path) -> None:
    commit("amazon")
    assert run_worker(worker, store.root, "amazon", "after_rename") == -signal.SIGKILL
    reopened = Store.open(store.root)  # open() alone repairs the index
    assert len(reopened._index.records()) == 2
    assert reopened.verify() == []
