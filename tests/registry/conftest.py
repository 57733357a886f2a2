"""Fixtures for the registry tests: a fresh store, manifest fields, a one-call commit helper and a
fast synthesiser of many versions (manifests written directly, then ``verify(reindex=True)``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cladapt.registry.manifest import VersionRecord
from cladapt.registry.store import Store

WORKER = Path(__file__).with_name("_worker.py")


def manifest_fields(seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Every Manifest field a trainer fills (task, version, files, created come from the store)."""
    fields: dict[str, Any] = {
        "method": "lora",
        "method_config": {},
        "composition": "route",
        "base_model": {"id": "tiny", "fingerprint": "fp-base", "tokenizer_fingerprint": "fp-tok"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"files": ["train.jsonl"], "sha256": "0" * 64, "rows": 10},
        "config": {"seed": seed},
        "seed": seed,
        "parents": [],
        "train_stats": {"steps": 1},
        "metrics": {"acc": 0.5},
    }
    fields.update(overrides)
    return fields


@pytest.fixture
def fields() -> Callable[..., dict[str, Any]]:
    return manifest_fields


@pytest.fixture
def worker() -> Path:
    return WORKER


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "registry")


CommitFn = Callable[..., VersionRecord]


@pytest.fixture
def commit(store: Store) -> CommitFn:
    """commit(task, status="active", parents=(), tensors=True, **field_overrides) -> VersionRecord."""

    def _commit(task: str, *, status: str = "active", parents: tuple[str, ...] = (), tensors: bool = False, **overrides: Any) -> VersionRecord:
        staging = store.stage(task)
        (staging.adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "task": task}))
        (staging.adapter_dir / "adapter_model.safetensors").write_bytes(b"\x00weights of " + task.encode())
        staging.write_json("router.json", {"task": task, "keys": [1, 2, 3]})
        if tensors:
            import torch

            staging.write_tensors("basis.safetensors", {"U": torch.arange(6.0).reshape(2, 3)}, metadata={"k": "v"})
        staging.manifest_fields = manifest_fields(parents=list(parents), **overrides)
        return store.commit(staging, status=status)

    return _commit


@pytest.fixture
def synth_versions() -> Callable[[Store, int, int], None]:
    """Write ``tasks x versions`` manifests straight to disk (no blobs), then rebuild the index."""

    def _synth(store: Store, tasks: int, versions: int) -> None:
        base = manifest_fields() | {"created": "2025-01-01T00:00:00.000Z", "files": [], "schema_version": 1}
        for t in range(tasks):
            task = f"task{t:03d}"
            task_dir = store.root / "tasks" / task
            task_dir.mkdir(parents=True)
            statuses = {}
            for v in range(1, versions + 1):
                (task_dir / f"v{v}").mkdir()
                manifest = base | {"task": task, "version": v, "parents": [f"{task}@{v - 1}"] if v > 1 else []}
                (task_dir / f"v{v}" / "manifest.json").write_text(json.dumps(manifest))
                statuses[str(v)] = "active" if v == versions else ("rejected" if v % 10 == 0 else "archived")
            status = {"format": 1, "generation": 1, "last_version": versions, "versions": statuses}
            (task_dir / "status.json").write_text(json.dumps(status))
        assert store.verify(reindex=True) == []

    return _synth
