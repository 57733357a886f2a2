"""How fast is the registry with many versions? ``cladapt list`` on 10,000 synthetic versions.

Synthesises ``tasks x versions`` manifests on disk (one real committed version is the template;
the rest are written directly, then the index is rebuilt with ``registry verify --reindex``),
then times, each as the median of ``--repeat`` runs:

* ``Store.open(root).list()`` in-process (the library call);
* ``cladapt list --json`` and ``cladapt list`` as a user runs them (a fresh process each time,
  Python and import start-up included);
* ``cladapt show task042`` (one version through the index).

Writes ``bench/results/registry_scale.json`` with the machine, versions and command.

    python bench/registry_scale.py --tasks 100 --versions 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def synthesise(root: Path, tasks: int, versions: int) -> None:
    from cladapt.registry.store import Store

    store = Store.init(root)
    staging = store.stage("template")
    (staging.adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 32}))
    (staging.adapter_dir / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    staging.manifest_fields.update(
        method="lora", method_config={"name": "lora"}, composition="route",
        base_model={"id": "smollm2-135m-instruct", "fingerprint": "f" * 32, "tokenizer_fingerprint": "t" * 32},
        lora={"r": 8, "alpha": 32.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        data={"files": ["train.jsonl"], "sha256": "0" * 64, "rows": 1000}, config={}, seed=0,
        train_stats={"steps": 125}, metrics={"score": 81.5},
    )
    template = json.loads((store.commit(staging).path / "manifest.json").read_text())
    template["files"] = []
    for t in range(tasks):
        task = f"task{t:03d}"
        task_dir = root / "tasks" / task
        task_dir.mkdir(parents=True)
        statuses = {}
        for v in range(1, versions + 1):
            (task_dir / f"v{v}").mkdir()
            manifest = {**template, "task": task, "version": v, "parents": [f"{task}@{v - 1}"] if v > 1 else []}
            (task_dir / f"v{v}" / "manifest.json").write_text(json.dumps(manifest))
            statuses[str(v)] = "active" if v == versions else "archived"
        (task_dir / "status.json").write_text(
            json.dumps({"format": 1, "generation": 1, "last_version": versions, "versions": statuses})
        )


def timed(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "registry_scale.json"))
    args = parser.parse_args()
    from cladapt.registry.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "reg"
        t0 = time.perf_counter()
        synthesise(root, args.tasks, args.versions)
        cli = [sys.executable, "-m", "cladapt"]
        reindex = timed([*cli, "registry", "verify", str(root), "--reindex"], 1)
        n = len(Store.open(root).list())
        lib = []
        for _ in range(args.repeat):
            t1 = time.perf_counter()
            Store.open(root).list()
            lib.append(time.perf_counter() - t1)
        results = {
            "versions": n,
            "synthesise_s": round(time.perf_counter() - t0 - reindex, 2),
            "verify_reindex_s": round(reindex, 2),
            "library_open_list_s": round(statistics.median(lib), 3),
            "cli_list_json_s": round(timed([*cli, "list", "--registry", str(root), "--json"], args.repeat), 3),
            "cli_list_table_s": round(timed([*cli, "list", "--registry", str(root)], args.repeat), 3),
            "cli_show_one_s": round(timed([*cli, "show", "--registry", str(root), f"task{args.tasks // 2:03d}", "--json"], args.repeat), 3),
            "cli_help_s": round(timed([*cli, "--help"], args.repeat), 3),
        }
    payload = {
        "benchmark": "registry_scale",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
