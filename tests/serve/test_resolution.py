"""A task name's resolution is re-read from the registry only when the task's status.json changed.

The request path resolves ``model`` on the event loop; a registry read there (status, index,
manifest checksum) stalls behind the decoding thread, which spread a wave of requests for distinct
adapters over several batches. After the TTL a resolution is re-checked with one ``stat``.
"""

from __future__ import annotations

from serve_helpers import add_version, start_server


def test_unchanged_task_is_not_read_again_and_a_new_version_is(served_registry, tiny_base_path, tmp_path,
                                                               monkeypatch) -> None:
    import shutil

    from cladapt.base_model import load
    from cladapt.registry.store import Store

    reg = tmp_path / "reg"
    shutil.copytree(served_registry, reg)
    server = start_server(reg, tiny_base_path, resolve_ttl_s=0)
    try:
        catalog = server.catalog
        reads: list[str] = []
        real_get = catalog.store.get
        monkeypatch.setattr(catalog.store, "get", lambda ref, **kw: reads.append(str(ref)) or real_get(ref, **kw))
        assert catalog.resolve("sentiment").label == "sentiment@1"
        for _ in range(5):  # TTL 0: expired every time, but status.json is the same file
            assert catalog.resolve("sentiment").label == "sentiment@1"
        assert reads == ["sentiment"]
        add_version(Store.open(reg), load(str(tiny_base_path)), "sentiment", seed=7)  # sentiment@2 active
        assert catalog.resolve("sentiment").label == "sentiment@2"
        assert reads == ["sentiment", "sentiment"]
    finally:
        server.close()
