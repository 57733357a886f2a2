"""Each training run gets its own claimed checkpoint folder (``Store.claim_run``).

Two identical trains started together used to share ``.work/runs/<key>``, and a later start
deleted the earlier run's checkpoints. Folders are now per run and claimed by their process;
``resume`` takes over a killed run's folder, never a live one's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from cladapt.registry.store import Store


def test_identical_runs_get_their_own_folders(store: Store) -> None:
    first = store.claim_run("amazon", "run-abc")
    (first.path / "checkpoint-5").mkdir()
    second = store.claim_run("amazon", "run-abc")  # same task, data and config, started while the first runs
    assert second.path != first.path
    assert (first.path / "checkpoint-5").is_dir()  # not deleted by the second start
    resumed = store.claim_run("amazon", "run-abc", resume=True)  # both are live: nothing to take over
    assert resumed.path not in (first.path, second.path)
    for run in (first, second, resumed):
        run.release()


def test_resume_takes_over_a_dead_runs_folder_and_a_fresh_start_clears_it(store: Store) -> None:
    killed = store.claim_run("amazon", "run-abc")
    (killed.path / "checkpoint-5").mkdir()
    killed.release()  # what the kernel does when the process dies
    resumed = store.claim_run("amazon", "run-abc", resume=True)
    assert resumed.path == killed.path and (resumed.path / "checkpoint-5").is_dir()
    resumed.release()
    fresh = store.claim_run("amazon", "run-abc")  # not resuming: the unclaimed checkpoints go
    assert not killed.path.exists() and fresh.path.is_dir()
    fresh.finish()
    assert not fresh.path.exists()
    assert list((store.root / ".work/runs/amazon").iterdir()) == []


def test_concurrent_processes_with_one_key(store: Store, tmp_path) -> None:
    done = tmp_path / "done"
    code = textwrap.dedent(f"""
        import pathlib, time
        from cladapt.registry.store import Store
        run = Store.open({str(store.root)!r}).claim_run("amazon", "same-key")
        (run.path / "checkpoint-1").mkdir()
        print(run.path, flush=True)
        while not pathlib.Path({str(done)!r}).exists():
            time.sleep(0.05)
        assert (run.path / "checkpoint-1").is_dir()
        run.finish()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    paths = {proc.stdout.readline().strip() for proc in procs}  # type: ignore[union-attr]
    assert len(paths) == 4  # four runs, four folders, all checkpoints alive at once
    done.touch()
    for proc in procs:
        assert proc.wait(120) == 0
    assert list((store.root / ".work/runs/amazon").iterdir()) == []


def test_a_killed_run_is_a_resumable_leftover(store: Store) -> None:
    code = textwrap.dedent(f"""
        import os, signal
        from cladapt.registry.store import Store
        run = Store.open({str(store.root)!r}).claim_run("amazon", "k")
        (run.path / "checkpoint-3").mkdir()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == -9
    leftovers = store.leftovers()
    assert len(leftovers) == 1 and leftovers[0].startswith(".work/runs/amazon/k.")
    assert store.gc() == []  # run checkpoints only go with runs=True
    resumed = store.claim_run("amazon", "k", resume=True)
    assert (resumed.path / "checkpoint-3").is_dir()
    resumed.release()
    assert store.gc(runs=True) == leftovers
