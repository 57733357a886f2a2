"""Child-process helper for the registry tests (not collected by pytest: no ``test_`` prefix).

Stages and commits ``count`` versions of one task. Run either as a script
(``python _worker.py ROOT TASK COUNT``, used by the crash tests with ``CLADAPT_TEST_CRASH_AT``) or
through ``runpy.run_path`` from a ``multiprocessing`` spawn context, with ``ARGV`` and an optional
``GO`` event in the initial globals so that several processes commit at the same moment.

The other operations the fault-injection tests kill: ``python _worker.py --promote ROOT REF``,
``--rollback ROOT TASK``, ``--rm ROOT REF``, and ``--index-txn ROOT`` (a raw SQLite write
transaction on the index, killed before COMMIT: what any killed index writer leaves).
"""

from __future__ import annotations

import os
import sys
from typing import Any


def manifest_fields(seed: int = 0) -> dict[str, Any]:
    """Every Manifest field a trainer fills (mirrors conftest.manifest_fields)."""
    return {
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
        "metrics": {},
    }


def main(argv: list[str], go: Any = None) -> None:
    from cladapt.registry.store import Store

    root, task, count = argv[0], argv[1], int(argv[2])
    store = Store.open(root)
    for i in range(count):
        staging = store.stage(task)
        (staging.adapter_dir / "adapter_config.json").write_text('{"r": 4}')
        (staging.adapter_dir / "adapter_model.safetensors").write_bytes(os.urandom(4096))
        staging.write_json("info.json", {"pid": os.getpid(), "i": i})
        staging.manifest_fields = manifest_fields(seed=i)
        if go is not None and i == 0:
            go.wait(60)
        store.commit(staging, reason=f"worker {os.getpid()}")


def other(op: str, root: str, arg: str) -> None:
    import signal
    import sqlite3

    from cladapt.registry.store import Store

    if op == "--index-txn":
        conn = sqlite3.connect(f"{root}/index.sqlite", isolation_level=None)
        conn.execute("PRAGMA cache_size=1")  # spill changed pages into the file before COMMIT
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE versions SET status='rejected', created='1999-01-01T00:00:00.000Z'")
        conn.execute("DELETE FROM versions WHERE version=1")
        os.kill(os.getpid(), signal.SIGKILL)
    store = Store.open(root)
    if op == "--promote":
        from cladapt.registry.lifecycle import promote

        promote(store, arg, reason="worker")
    elif op == "--rollback":
        from cladapt.registry.lifecycle import rollback

        rollback(store, arg, reason="worker")
    elif op == "--rm":
        store.remove(arg, reason="worker")
    else:
        raise SystemExit(f"unknown operation {op}")


if __name__ == "__main__":
    argv = globals().get("ARGV") or sys.argv[1:]
    if argv and argv[0].startswith("--"):
        other(argv[0], argv[1], argv[2] if len(argv) > 2 else "")
    else:
        main(argv, globals().get("GO"))
