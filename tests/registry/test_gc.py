"""Leftovers of killed processes are reported by ``verify`` and removed by ``registry gc``; what a
live process holds (a claimed staging folder) is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cladapt.cli import cli
from cladapt.registry.store import Store

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("point", ["after_manifest", "before_rename"])
def test_killed_commit_leaves_a_staging_that_gc_removes(store: Store, commit, worker: Path, point: str) -> None:
    commit("amazon")
    env = {**os.environ, "CLADAPT_TEST_CRASH_AT": point}
    proc = subprocess.run([sys.executable, str(worker), str(store.root), "amazon", "1"], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    live = store.stage("amazon")  # a run in progress in this process
    report = store.verify_report()
    assert report.problems == []
    assert len(report.leftovers) == 1 and report.leftovers[0].startswith(".work/staging/")
    out = CliRunner().invoke(cli, ["registry", "verify", str(store.root)])
    assert out.exit_code == 0 and "1 leftover(s)" in out.output and "registry gc" in out.output
    out = CliRunner().invoke(cli, ["registry", "gc", str(store.root)])
    assert out.exit_code == 0 and "removed 1 leftover(s)" in out.output
    assert store.leftovers() == []
    assert live.dir.is_dir()  # claimed: kept
    staged = sorted(p.name for p in (store.root / ".work/staging").iterdir())
    assert staged == sorted([live.dir.name, live.dir.name + ".lock"])
    assert any(e["action"] == "gc" for e in store.audit_log())
    live.discard()
    assert list((store.root / ".work/staging").iterdir()) == []
