"""The lock is held only while committing: staging and training never wait for it."""

from __future__ import annotations

import threading
import time

import pytest

from cladapt.errors import RegistryError
from cladapt.registry.lock import StoreLock
from cladapt.registry.store import Store


def test_staging_does_not_need_the_lock_but_commit_waits(store: Store, fields) -> None:
    result: dict[str, object] = {}
    staged = threading.Event()

    def train() -> None:
        staging = store.stage("amazon")
        (staging.adapter_dir / "adapter_config.json").write_text("{}")
        staging.write_json("x.json", {"a": 1})
        staging.manifest_fields = fields()
        staged.set()
        result["record"] = store.commit(staging)

    with store._lock:  # another writer holds the lock ...
        thread = threading.Thread(target=train)
        thread.start()
        assert staged.wait(10), "staging blocked on the registry lock"  # ... training is not blocked
        time.sleep(0.2)
        assert "record" not in result  # ... but the commit waits for it
    thread.join(10)
    assert result["record"].version == 1  # type: ignore[attr-defined]


def test_threads_commit_concurrently(store: Store, commit) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                commit("amazon")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert [r.version for r in store.list("amazon")] == list(range(1, 13))
    assert store.verify() == []


def test_lock_times_out_with_a_clear_error(store: Store) -> None:
    path = store.root / ".work" / "lock"
    holder = StoreLock(path)
    ready, done = threading.Event(), threading.Event()

    def hold() -> None:
        with holder:
            ready.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait(10)
    try:
        with pytest.raises(RegistryError, match="locked by another process") as info:
            StoreLock(path, timeout_s=0.2).acquire()
        assert "CLADAPT_LOCK_TIMEOUT" in (info.value.hint or "")
    finally:
        done.set()
        thread.join(10)


def test_lock_is_reentrant_and_shared_between_instances(store: Store) -> None:
    other = Store.open(store.root)
    assert other._lock is store._lock
    with store._lock:
        with other._lock:
            assert store._lock.held
        assert store._lock.held
    assert not store._lock.held
    with pytest.raises(RuntimeError):
        store._lock.release()
