"""Training overhead of every method against plain PEFT LoRA, and its growth with the task count.

For each method, in its own process (so peak memory is per method):

1. train tasks 1..T in sequence into a fresh registry (real benchmark tasks from the CL
   benchmark folder; the untimed tasks take one optimizer step each, enough to create the
   adapters, masks and bases later tasks depend on);
2. tasks 2 and T are *timed*: the same fixed rows (so the batch is identical), ``warmup + steps``
   optimizer steps, and the median step time after warmup is recorded.

The baseline is plain PEFT: ``transformers.Trainer`` on ``get_peft_model(base, LoraConfig)``
with the same rows, batch, rank and targets, no cladapt code. Results (median step time per
method, ratio to plain PEFT, ratio task T / task 2, peak memory) go to
``bench/results/train_overhead.json`` with the machine, versions and command.

    python bench/train_overhead.py                       # all methods, default model
    python bench/train_overhead.py --methods olora,inflora --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("CLADAPT_SHARED", ROOT.parent / "shared")) / "data" / "cl-benchmark"
METHODS = ["lora", "seq-lora", "inc-lora", "olora", "owlora", "reglora", "inflora"]


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def _task_files(data_dir: Path, n_tasks: int, rows: int, work: Path) -> list[tuple[str, Path]]:
    """The first n tasks of the benchmark's long order, ``rows`` training rows each."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    order = manifest.get("orders", {}).get("long") or sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    present = [t for t in order if (data_dir / t / "train.jsonl").is_file()]
    out = []
    for task in present[:n_tasks]:
        lines = (data_dir / task / "train.jsonl").read_text().splitlines()[:rows]
        path = work / f"{task}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        out.append((task.replace(".", "-"), path))
    if len(out) < n_tasks:
        raise SystemExit(f"{data_dir} has only {len(out)} tasks; need {n_tasks}")
    return out


def _median_after(times: list[float], warmup: int) -> float:
    kept = times[warmup:] or times
    return statistics.median(kept)


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_plain_peft(args: argparse.Namespace, timing_rows: Path) -> dict[str, Any]:
    """The baseline: transformers.Trainer + PEFT LoRA, no cladapt code in the loop."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from cladapt.base_model import load
    from cladapt.train.chat import encode_all
    from cladapt.train.data import load_examples
    from cladapt.train.loop import Collator

    model, tok, _ = load(args.base_model)
    enc, _ = encode_all(tok, load_examples([timing_rows]).examples, max_length=args.max_length, overlong="truncate")
    ds = datasets.Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in enc])
    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
            learning_rate=1e-3, lr_scheduler_type="constant", report_to=[], save_strategy="no",
            logging_steps=1000, seed=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        )
        Trainer(model=peft_model, args=targs, train_dataset=ds, data_collator=Collator(tok.pad_token_id),
                callbacks=[timer]).train()
    med = _median_after(timer.times, args.warmup)
    return {"method": "plain-peft-lora", "step_s_task2": med, "step_s_taskT": med, "peak_mb": _peak_mb()}


def run_method(args: argparse.Namespace, method: str, work: Path) -> dict[str, Any]:
    """Train tasks 1..T with ``method``; time tasks 2 and T on the same rows."""
    from cladapt.base_model import load
    from cladapt.config import load_config
    from cladapt.registry.store import Store
    from cladapt.train.run import train_task

    tasks = _task_files(Path(args.data_dir), args.tasks, args.rows, work)
    timing_rows = tasks[0][1]
    loaded = load(args.base_model)
    store = Store.init(work / "reg")
    # every method gets the baseline's LoRA shape (r=8 on q_proj/v_proj), so the ratio is the
    # method's own cost, not that of a bigger adapter (reglora's preset targets all linear layers)
    base = [f"train.batch_size={args.batch}", f"train.max_length={args.max_length}", "train.logging_steps=1000",
            "train.save_steps=100000", "lora.r=8", "lora.target_modules=[q_proj,v_proj]"]
    timed: dict[int, dict[str, Any]] = {}
    for i, (task, path) in enumerate(tasks, start=1):
        is_timed = i in (2, args.tasks)
        steps = args.warmup + args.steps if is_timed else 1
        cfg, _ = load_config(method=method, overrides=[*base, f"train.max_steps={steps}"])
        timer = _step_timer()
        t0 = time.perf_counter()
        train_task(store, f"t{i}-{task}", [str(timing_rows if is_timed else path)], cfg, loaded=loaded,
                   callbacks=[timer])
        if is_timed:
            timed[i] = {"median_step_s": _median_after(timer.times, args.warmup), "task_wall_s": time.perf_counter() - t0}
        print(f"[{method}] task {i}/{args.tasks} {task} done in {time.perf_counter() - t0:.1f} s", flush=True)
    return {
        "method": method,
        "step_s_task2": timed[2]["median_step_s"],
        "step_s_taskT": timed[args.tasks]["median_step_s"],
        "task_wall_s_task2": timed[2]["task_wall_s"],
        "task_wall_s_taskT": timed[args.tasks]["task_wall_s"],
        "peak_mb": _peak_mb(),
    }


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import cladapt

    return {"cladapt": cladapt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--tasks", type=int, default=8, help="T: the last timed task")
    parser.add_argument("--rows", type=int, default=64, help="training rows per untimed task")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_overhead.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--one-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if args.one == "plain-peft-lora":
                rows = _task_files(Path(args.data_dir), 1, args.rows, work)[0][1]
                result = run_plain_peft(args, rows)
            else:
                result = run_method(args, args.one, work)
        Path(args.one_out).write_text(json.dumps(result))
        return

    results: list[dict[str, Any]] = []
    for method in ["plain-peft-lora", *args.methods.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", method, "--one-out", out]
        print(f"== {method}", flush=True)
        subprocess.run(cmd, check=True)
        results.append(json.loads(Path(out).read_text()))
        os.unlink(out)
    plain = results[0]["step_s_task2"]
    for r in results:
        r["ratio_vs_plain_peft"] = round(r["step_s_task2"] / plain, 3)
        r["ratio_taskT_vs_task2"] = round(r["step_s_taskT"] / r["step_s_task2"], 3)
    payload = {
        "benchmark": "train_overhead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": _versions(),
        "settings": {k: getattr(args, k) for k in ("base_model", "tasks", "rows", "batch", "max_length", "steps",
                                                   "warmup")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"{'method':18} {'step s (task 2)':>16} {'vs PEFT':>8} {'task T / 2':>10} {'peak MB':>8}")
    for r in results:
        print(f"{r['method']:18} {r['step_s_task2']:16.3f} {r['ratio_vs_plain_peft']:8.3f} "
              f"{r['ratio_taskT_vs_task2']:10.3f} {r['peak_mb']:8.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
