"""Real processes: concurrent trains into one registry, and runs killed with SIGKILL."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import task_rows, tiny_overrides, write_jsonl

pytestmark = pytest.mark.multiprocess


def state_digest(reg: Path) -> dict[str, str]:
    """sha256 of every registry file except the scratch area .work/."""
    out = {}
    for p in sorted(reg.rglob("*")):
        rel = p.relative_to(reg)
        if p.is_file() and rel.parts[0] != ".work":
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cladapt(*args: object, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "cladapt", *[str(a) for a in args]]


def train_args(reg: Path, task: str, data: Path, base: Path, **extra: object) -> list[str]:
    args = cladapt("train", "--registry", reg, "--task", task, "--data", data, "--base-model", base)
    for item in tiny_overrides(**extra):
        args += ["--set", item]
    return args


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONSAFEPATH="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_two_concurrent_trains_both_land(tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]) -> None:
    reg = tmp_path / "reg"
    subprocess.run(cladapt("registry", "init", reg), check=True, env=_env())
    procs = [
        subprocess.Popen(train_args(reg, "sentiment", two_tasks["sentiment"], tiny_base_path, **{"train.seed": s}),
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for s in (1, 2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-2000:]
    from cladapt.registry.store import Store

    store = Store.open(reg)
    assert sorted(r.version for r in store.list("sentiment")) == [1, 2]
    assert sorted(r.manifest.seed for r in store.list("sentiment")) == [1, 2]
    assert store.verify() == []


def _wait_for(pred, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_sigkill_mid_run_leaves_registry_unchanged_and_resume_finishes(
    tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]
) -> None:
    reg = tmp_path / "reg"
    subprocess.run(cladapt("registry", "init", reg), check=True, env=_env())
    subprocess.run(train_args(reg, "sentiment", two_tasks["sentiment"], tiny_base_path), check=True, env=_env())
    before = state_digest(reg)
    data = write_jsonl(tmp_path / "big.jsonl", task_rows("topics", 64))
    args = train_args(reg, "topics", data, tiny_base_path, **{"train.max_steps": 400, "train.save_steps": 5})
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = reg / ".work" / "runs"
    assert _wait_for(lambda: any(runs.glob("*/*/checkpoint-*")), 120), "no checkpoint was written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state_digest(reg) == before
    from cladapt.registry.store import Store

    assert Store.open(reg).verify() == []
    resumed = subprocess.run(
        train_args(reg, "topics", data, tiny_base_path, **{"train.max_steps": 400, "train.save_steps": 5})
        + ["--resume"], env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert [r.version for r in Store.open(reg).list("topics")] == [1]


@pytest.mark.parametrize("point", ["before_rename", "after_rename"])
def test_sigkill_mid_commit(tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path], point: str) -> None:
    from cladapt.registry.store import Store

    reg = tmp_path / "reg"
    subprocess.run(cladapt("registry", "init", reg), check=True, env=_env())
    subprocess.run(train_args(reg, "sentiment", two_tasks["sentiment"], tiny_base_path), check=True, env=_env())
    before = state_digest(reg)
    proc = subprocess.run(train_args(reg, "topics", two_tasks["topics"], tiny_base_path),
                          env=_env(CLADAPT_TEST_CRASH_AT=point), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    store = Store.open(reg)
    assert store.verify() == []
    assert [(r.task, r.version) for r in store.list("sentiment")] == [("sentiment", 1)]
    if point == "before_rename":
        assert state_digest(reg) == before
        assert store.list("topics") == []
    else:  # the version had landed; the index is repaired on open
        assert [r.version for r in store.list("topics")] == [1]
