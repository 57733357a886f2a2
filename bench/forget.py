"""Forgetting on the default model, through the CLI: does `cladapt forget` remove one task and keep another?

1. write the demo's two tasks (sentiment, topics) with held-out test rows;
2. train both with ``inc-lora`` (summed adapters), score both with ``eval --compose sum``;
3. ``cladapt forget`` topics (forget set: its training rows; retain set: sentiment's);
4. score both again with the forgetting adapter in the sum.

Writes ``bench/results/forget.json`` (accuracies before/after, GS-LoRA's H, the gslora.json
record, wall times, machine, versions, command).

    python bench/forget.py                 # default model
    python bench/forget.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cladapt(*args: object, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "cladapt", *[str(a) for a in args]]
    print("$", " ".join(cmd[2:]), flush=True)
    out = subprocess.run(cmd, check=True, text=True, capture_output=capture)
    return out.stdout if capture else ""


def score(reg: Path, data: Path, task: str) -> float:
    out = cladapt("eval", "--registry", reg, "--compose", "sum", "--data", data, "--task", task,
                  "--max-new-tokens", "auto", "--no-record", "--json", capture=True)
    return float(json.loads(out)["score"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per training task")
    parser.add_argument("--forget-steps", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "forget.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_data.py"), str(work / "data"),
                        "--train", "160", "--test", "40"], check=True)
        reg = work / "reg"
        common = ["--set", f"train.max_steps={args.steps}", "--set", "train.max_length=128"]
        for task in ("sentiment", "topics"):
            cladapt("train", "--registry", reg, "--task", task, "--method", "inc-lora",
                    "--data", work / "data" / f"{task}_train.jsonl", *common)
        tests = {t: work / "data" / f"{t}_test.jsonl" for t in ("sentiment", "topics")}
        before = {t: score(reg, p, t) for t, p in tests.items()}
        t_forget = time.time()
        cladapt("forget", "--registry", reg, "--task", "forget-topics",
                "--forget", work / "data" / "topics_train.jsonl", "--retain", work / "data" / "sentiment_train.jsonl",
                "--set", f"train.max_steps={args.forget_steps}", "--set", "train.max_length=128")
        forget_wall = time.time() - t_forget
        after = {t: score(reg, p, t) for t, p in tests.items()}
        shown = json.loads(cladapt("show", "--registry", reg, "forget-topics", "--json", capture=True))
        gs = {}
        for f in shown["files"]:
            if f["path"].endswith("gslora.json"):
                gs = json.loads((Path(shown["path"]) / f["path"]).read_text())
    drop_f = before["topics"] - after["topics"]
    acc_r = after["sentiment"]
    h = 2 * drop_f * acc_r / (drop_f + acc_r) if drop_f + acc_r > 0 else 0.0
    payload: dict[str, Any] = {
        "benchmark": "forget",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": vars(args),
        "accuracy_before": before,
        "accuracy_after": after,
        "H": round(h, 2),
        "forget_wall_s": round(forget_wall, 1),
        "total_wall_s": round(time.time() - t0, 1),
        "gslora": gs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(json.dumps({k: payload[k] for k in ("accuracy_before", "accuracy_after", "H", "forget_wall_s")}, indent=2))


if __name__ == "__main__":
    main()
