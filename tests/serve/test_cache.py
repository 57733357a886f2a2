"""AdapterCache as a state machine: after every ensure/pin/unpin/evict, exactly which adapters are loaded."""

from __future__ import annotations

import pytest

from cladapt.errors import CapacityError
from cladapt.serve.cache import AdapterCache


class FakeModel:
    """Stands in for the PeftModel: records loads and unloads."""

    def __init__(self) -> None:
        self.adapters: set[str] = set()
        self.log: list[str] = []

    def load(self, key: str) -> str:
        name = key.replace("@", "__v")
        assert name not in self.adapters, f"{key} loaded twice"
        self.adapters.add(name)
        self.log.append(f"+{key}")
        return name

    def unload(self, name: str) -> None:
        self.adapters.remove(name)
        self.log.append(f"-{name}")


@pytest.fixture
def fake() -> FakeModel:
    return FakeModel()


def test_lru_order_hits_misses_and_eviction(fake) -> None:
    cache = AdapterCache(2, fake.load, fake.unload)
    assert cache.ensure(["a@1"]) == ["a__v1"]
    assert cache.ensure(["b@1", "a@1"]) == ["b__v1", "a__v1"]
    assert cache.loaded() == ["b@1", "a@1"]  # a used last
    cache.ensure(["c@1"])  # evicts b, the least recently used
    assert cache.loaded() == ["a@1", "c@1"] and fake.adapters == {"a__v1", "c__v1"}
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 3, 1)
    assert fake.log == ["+a@1", "+b@1", "-b__v1", "+c@1"]


def test_ensure_never_evicts_what_the_same_batch_needs(fake) -> None:
    cache = AdapterCache(2, fake.load, fake.unload)
    cache.ensure(["a@1", "b@1"])
    assert cache.ensure(["b@1", "c@1"]) == ["b__v1", "c__v1"]  # a goes, b stays although older
    assert cache.loaded() == ["b@1", "c@1"]
    with pytest.raises(CapacityError):
        cache.ensure(["a@1", "b@1", "c@1"])
    assert cache.loaded() == ["b@1", "c@1"]  # a refused batch changes nothing


def test_pinned_adapters_stay_and_count_against_capacity(fake) -> None:
    cache = AdapterCache(3, fake.load, fake.unload)
    cache.pin("p@1")
    cache.ensure(["a@1", "b@1"])
    cache.ensure(["c@1"])
    assert cache.loaded() == ["p@1", "b@1", "c@1"] and cache.pinned() == {"p@1"}
    assert not cache.room_for({"a@1", "b@1", "c@1"}) and cache.room_for({"a@1", "b@1"})
    cache.pin("q@1")
    cache.pin("r@1")
    with pytest.raises(CapacityError):
        cache.pin("s@1")
    with pytest.raises(CapacityError):
        cache.ensure(["a@1"])  # every slot is pinned
    cache.unpin("q@1")
    cache.ensure(["a@1"])
    assert set(cache.loaded()) == {"p@1", "r@1", "a@1"}


def test_evict_and_failed_load_leave_consistent_state(fake) -> None:
    def flaky(key: str) -> str:
        if key == "bad@1":
            raise RuntimeError("checksum mismatch")
        return fake.load(key)

    cache = AdapterCache(2, flaky, fake.unload)
    cache.ensure(["a@1"])
    with pytest.raises(RuntimeError):
        cache.pin("bad@1")
    assert cache.loaded() == ["a@1"] and cache.pinned() == set()
    assert cache.evict("a@1") and not cache.evict("a@1")
    assert cache.loaded() == [] and fake.adapters == set()
