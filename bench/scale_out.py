"""Scaling out on the default model: 1 vs 2 processes (same global batch), and a QLoRA base vs fp32.

Each configuration is one real ``cladapt train`` of the first ``--rows`` amazon training rows of the
CL benchmark for ``--steps`` optimizer steps, LoRA r=8 on q/v, global batch 8, in its own registry:

* ``1proc``: one process, batch 8, ``OMP_NUM_THREADS=--threads``;
* ``2proc``: ``torchrun --nproc_per_node 2``, batch 4 per process, ``OMP_NUM_THREADS=--threads/2`` each
  (the same CPU threads in all), gloo;
* ``1proc-4bit``: as ``1proc`` with ``--load-in-4bit`` (bitsandbytes NF4 base);
* with ``--deepspeed`` also ``2proc-zero2`` (needs the deepspeed extra).

Reported per configuration: seconds per optimizer step (the Trainer's ``train_runtime / steps``,
model loading and the commit excluded), the wall time of the whole command, and the peak resident
memory of the largest process (``ru_maxrss`` of the launcher's waited-for children, read in a fresh
wrapper process per configuration). Writes ``bench/results/scale_out.json``.

    python bench/scale_out.py [--steps 10] [--deepspeed]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLADAPT_SHARED", ROOT.parent / "shared")) / "data" / "cl-benchmark"

#: runs ``argv`` and prints the peak RSS (KiB) of its largest waited-for descendant as the last line
_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config(name: str, work: Path, rows: Path, args: argparse.Namespace) -> dict[str, Any]:
    procs = 2 if name.startswith("2proc") else 1
    sets = {"train.max_steps": args.steps, "train.batch_size": 8 // procs, "train.logging_steps": args.steps,
            "train.save_steps": 10_000, "lora.r": 8, "train.max_length": args.max_length}
    cli = ["-m", "cladapt", "train", "--task", "amazon", "--data", str(rows), "--registry", str(work / name)]
    for k, v in sets.items():
        cli += ["--set", f"{k}={v}"]
    if name.endswith("4bit"):
        cli.append("--load-in-4bit")
    if name.endswith("zero2"):
        cli += ["--deepspeed", "zero2"]
    subprocess.run([sys.executable, "-m", "cladapt", "registry", "init", str(work / name)], check=True,
                   capture_output=True)
    launcher = [sys.executable]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // procs)), "GLOO_SOCKET_IFNAME": "lo",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads
           # of one process steal the cores the other process's threads need
           "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.perf_counter()
    log = args.log_dir / f"scale_out_{name}.log"
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, *launcher, *cli], env=env, stdout=subprocess.PIPE,
                              stderr=fh, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: see {log}")
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads(next((work / name / "tasks" / "amazon").glob("v*/manifest.json")).read_text())
    stats = manifest["train_stats"]
    versions = len(list((work / name / "tasks" / "amazon").glob("v*")))
    return {
        "processes": stats["processes"],
        "versions_committed": versions,
        "global_batch": stats["global_batch"],
        "steps": stats["steps"],
        "seconds_per_step": round(stats["train_runtime"] / stats["steps"], 3),
        "train_loss": stats["train_loss"],
        "wall_seconds": round(wall, 1),
        "peak_rss_mib_largest_process": round(peak_kib / 1024, 1),
        "quantization": stats.get("quantization"),
        "omp_threads_per_process": max(1, args.threads // procs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all, split over the processes")
    ap.add_argument("--deepspeed", action="store_true", help="also 2 processes under --deepspeed zero2")
    ap.add_argument("--configs", default="1proc,2proc,1proc-4bit",
                    help="which configurations (results of earlier runs in --out are kept)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale_out.json")
    ap.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()), help="each run's log goes here")
    args = ap.parse_args()
    names = args.configs.split(",") + (["2proc-zero2"] if args.deepspeed else [])
    results: dict[str, Any] = json.loads(args.out.read_text())["configs"] if args.out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = work / "amazon.jsonl"
        with (DATA / "amazon" / "train.jsonl").open() as fh:
            rows.write_text("".join(next(fh) for _ in range(args.rows)))
        for name in names:
            results[name] = run_config(name, work, rows, args)
            print(name, json.dumps(results[name]))
            write_report(results, args)


def write_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Write every configuration measured so far, with the ratios their pairs allow."""
    import torch

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results:
            return round(results[a][key] / results[b][key], 3)
        return None

    report = {
        "what": __doc__.splitlines()[0],
        "model": "smollm2-135m-instruct",
        "configs": results,
        "ratios": {
            "step_time_2proc_over_1proc": ratio("2proc", "1proc", "seconds_per_step"),
            "peak_rss_per_process_2proc_over_1proc": ratio("2proc", "1proc", "peak_rss_mib_largest_process"),
            "peak_rss_4bit_over_fp32": ratio("1proc-4bit", "1proc", "peak_rss_mib_largest_process"),
            "step_time_4bit_over_fp32": ratio("1proc-4bit", "1proc", "seconds_per_step"),
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                    "torch": torch.__version__},
        "command": "python bench/scale_out.py " + " ".join(sys.argv[1:]),
        "note": "CPU only, gloo; the machine's cores were shared with other work while measuring",
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
