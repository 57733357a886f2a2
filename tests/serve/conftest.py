"""Fixtures of the server tests: a served registry on the tiny model and a live HTTP server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# appended, not prepended: `conftest` must stay tests/conftest.py for every test module
sys.path.append(str(Path(__file__).parent))  # serve_helpers.py, fake_vllm.py

from serve_helpers import ROUTE_TASKS, SUM_TASKS, add_version, start_server  # noqa: E402


@pytest.fixture(scope="session")
def served_registry(tmp_path_factory: pytest.TempPathFactory, tiny_base_path: Path) -> Path:
    """sentiment@1, topics@1 (routed, with signatures), news@1, qa@1 (sum-composed). Shared: tests that
    change the registry work on a copy."""
    from cladapt.base_model import load
    from cladapt.registry.store import Store

    store = Store.init(tmp_path_factory.mktemp("served") / "reg")
    loaded = load(str(tiny_base_path))
    for seed, (task, prompts) in enumerate(ROUTE_TASKS.items(), start=1):
        add_version(store, loaded, task, seed=seed, prompts=prompts)
    for seed, task in enumerate(SUM_TASKS, start=10):
        add_version(store, loaded, task, seed=seed, composition="sum")
    return store.root


@pytest.fixture(scope="module")
def live(served_registry: Path, tiny_base_path: Path) -> Iterator[Any]:
    """One HTTP server for a module's tests: dtkr router on the base space, admin token ``s3cret``."""
    from cladapt.serve.app import create_app
    from cladapt.serve.running import BackgroundServer

    server = start_server(served_registry, tiny_base_path, router="dtkr", admin_token="s3cret",
                          router_config={"space": "base", "groups": 1, "keys": 5, "retrieve": 1}, cache_capacity=4,
                          batch_window_ms=20)
    try:
        with BackgroundServer(create_app(server)) as bg:
            bg.server = server
            yield bg
    finally:
        server.close()
