"""Training step time of every method against plain PEFT LoRA: full logits vs the faster path, fp32 and bf16.

One run measures, for every precision (``--precisions``: fp32, and bf16 autocast with fp32 weights):

* the baseline, plain PEFT: ``transformers.Trainer`` on ``get_peft_model(base, LoraConfig)`` with
  the same rows, batch, rank and targets and no cladapt code (its default shuffling, full logits);
* every method (``--methods``) under every variant (``--variants``):

  - ``full``: ``train.loss_logits=full`` (the LM head and cross-entropy at every position), shuffled;
  - ``labelled``: ``train.loss_logits=labelled`` (only at the positions with a label), shuffled;
  - ``fast``: ``labelled`` plus ``train.group_by_length`` (seeded length-grouped batches);
  - ``grouped``: ``full`` plus ``train.group_by_length``.

Each (method, variant, precision) runs in its own process (so peak memory is its own) and trains
tasks 1..T of the benchmark's long order into a fresh registry; the untimed tasks take one optimizer
step each (enough for the adapters, masks and bases later tasks depend on). Tasks 2 and T are
*timed* on the same fixed rows (``--rows`` rows of task 1) for ``--epochs`` epochs; the first epoch
is warm-up and the step times of the others are kept. With length grouping the step time depends on
the batch, so the figure compared is the **mean** step time over whole epochs (the median and the
10th/90th percentiles are recorded too, with every step's time). The padded share of the decoder's
input grid over the timed task's training forwards (all its epochs) is recorded per run (``pad``).

``--repeats N`` runs the whole sequence N times, interleaved (baseline, then every method and variant,
per precision), and reports the median of the N means. Results go to
``bench/results/train_overhead.json`` (machine, versions, command, settings).

    python bench/train_overhead.py                                   # everything, default model
    python bench/train_overhead.py --methods lora,olora --variants full,fast --precisions fp32
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
#: variant -> (train.loss_logits, train.group_by_length)
VARIANTS = {"full": ("full", False), "labelled": ("labelled", False), "fast": ("labelled", True),
            "grouped": ("full", True)}
BASELINE = "plain-peft-lora"
QUOTED_NO = '"no"'  # --set values are YAML, where a bare no is false


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.steps_per_epoch = 0
            self._t0 = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kw: Any) -> None:
            if train_dataloader is not None:
                self.steps_per_epoch = len(train_dataloader) // max(1, args.gradient_accumulation_steps)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


class PadMeter:
    """Real and padded tokens entering the decoder in training forwards (grad enabled)."""

    def __init__(self, model: Any) -> None:
        import torch

        self.real = self.grid = 0

        def count(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            mask = kwargs.get("attention_mask")
            if mask is not None and torch.is_grad_enabled():
                self.real += int(mask.sum())
                self.grid += mask.numel()

        self.handle = model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)

    def reset(self) -> None:
        self.real = self.grid = 0

    def fraction(self) -> float:
        return round(1 - self.real / self.grid, 4) if self.grid else 0.0


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


def step_stats(times: list[float], steps_per_epoch: int) -> dict[str, Any]:
    """Statistics of the step times after the first (warm-up) epoch."""
    kept = times[steps_per_epoch:] if 0 < steps_per_epoch < len(times) else times
    q = statistics.quantiles(kept, n=10) if len(kept) >= 2 else [kept[0]] * 9
    return {"mean_s": statistics.fmean(kept), "median_s": statistics.median(kept), "p10_s": q[0], "p90_s": q[-1],
            "steps": len(kept), "times_s": [round(t, 4) for t in kept]}


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
    from cladapt.data.rows import load_examples
    from cladapt.train.chat import encode_all
    from cladapt.train.loop import Collator

    model, tok, _ = load(args.base_model)
    enc, _ = encode_all(tok, load_examples([timing_rows]).examples, max_length=args.max_length, overlong="truncate")
    ds = datasets.Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in enc])
    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    timer, pads = _step_timer(), PadMeter(model)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
            learning_rate=1e-3, lr_scheduler_type="constant", report_to=[], save_strategy="no",
            logging_steps=1000, seed=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
            bf16=args.precision == "bf16",
        )
        Trainer(model=peft_model, args=targs, train_dataset=ds, data_collator=Collator(tok.pad_token_id),
                callbacks=[timer]).train()
    stats = step_stats(timer.times, timer.steps_per_epoch)
    return {"task2": stats, "taskT": stats, "pad": pads.fraction(), "peak_mb": _peak_mb()}


def run_method(args: argparse.Namespace, method: str, variant: str, work: Path) -> dict[str, Any]:
    """Train tasks 1..T with ``method``; time tasks 2 and T on the same rows."""
    from cladapt.base_model import load
    from cladapt.config import load_config
    from cladapt.registry.store import Store
    from cladapt.train.run import train_task

    tasks = _task_files(Path(args.data_dir), args.tasks, args.rows, work)
    timing_rows = tasks[0][1]
    loaded = load(args.base_model)
    store = Store.init(work / "reg")
    loss_logits, grouped = VARIANTS[variant]
    # every method gets the baseline's LoRA shape (r=8 on q_proj/v_proj), so the ratio is the
    # method's own cost, not that of a bigger adapter (reglora's preset targets all linear layers)
    base = [f"train.batch_size={args.batch}", f"train.max_length={args.max_length}", "train.logging_steps=1000",
            "train.save_steps=100000", "lora.r=8", "lora.target_modules=[q_proj,v_proj]",
            f"train.mixed_precision={'bf16' if args.precision == 'bf16' else QUOTED_NO}",
            f"train.loss_logits={loss_logits}", f"train.group_by_length={str(grouped).lower()}"]
    pads = PadMeter(loaded[0])
    out: dict[str, Any] = {}
    for i, (task, path) in enumerate(tasks, start=1):
        is_timed = i in (2, args.tasks)
        length = [f"train.epochs={args.epochs}"] if is_timed else ["train.max_steps=1"]
        cfg, _ = load_config(method=method, overrides=[*base, *length])
        timer = _step_timer()
        pads.reset()
        t0 = time.perf_counter()
        train_task(store, f"t{i}-{task}", [str(timing_rows if is_timed else path)], cfg, loaded=loaded,
                   callbacks=[timer])
        if is_timed:
            stats = {**step_stats(timer.times, timer.steps_per_epoch), "task_wall_s": time.perf_counter() - t0}
            for key in ["task2"] * (i == 2) + ["taskT"] * (i == args.tasks):
                out[key], out[f"pad_{key}"] = stats, pads.fraction()
        print(f"[{method}/{variant}/{args.precision}] task {i}/{args.tasks} {task} done in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return {"task2": out["task2"], "taskT": out["taskT"], "pad": out["pad_task2"], "peak_mb": _peak_mb()}


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import cladapt

    return {"cladapt": cladapt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def _run_one(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.one == BASELINE:
            rows = _task_files(Path(args.data_dir), 1, args.rows, work)[0][1]
            result = run_plain_peft(args, rows)
        else:
            result = run_method(args, args.one, args.variant, work)
    Path(args.one_out).write_text(json.dumps(result))


def _child(args: argparse.Namespace, method: str, variant: str, precision: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, *sys.argv[1:], "--one", method, "--variant", variant,
           "--precision", precision, "--one-out", out]
    print(f"== {method} {variant} {precision}", flush=True)
    try:
        subprocess.run(cmd, check=True)
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of each figure; ratios against the baseline of the same precision."""
    def med(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in runs)

    return {"step_s_task2": med("task2", "mean_s"), "step_s_taskT": med("taskT", "mean_s"),
            "median_step_s_task2": med("task2", "median_s"), "p10_s_task2": med("task2", "p10_s"),
            "p90_s_task2": med("task2", "p90_s"), "pad": statistics.median(r["pad"] for r in runs),
            "peak_mb": max(r["peak_mb"] for r in runs), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variants", default="full,labelled,fast", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast, fp32 weights)")
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--tasks", type=int, default=8, help="T: the last timed task")
    parser.add_argument("--rows", type=int, default=64, help="training rows per task (and of the timed tasks)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the timed tasks; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the whole sequence")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_overhead.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run in this process
    parser.add_argument("--variant", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--one-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _run_one(args)
        return
    variants = args.variants.split(",")
    precisions = args.precisions.split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [p for p in precisions if p not in ("fp32", "bf16")]
    if unknown:
        raise SystemExit(f"unknown variants/precisions {unknown}")
    if args.epochs < 2 or args.tasks < 2:
        raise SystemExit("--epochs and --tasks must be >= 2 (the first epoch is warm-up; task 2 is timed)")

    cells = [(p, BASELINE, "-") for p in precisions]
    cells += [(p, m, v) for p in precisions for m in args.methods.split(",") for v in variants]
    raw: dict[tuple[str, str, str], list[dict[str, Any]]] = {c: [] for c in cells}
    for _ in range(args.repeats):
        for cell in cells:
            raw[cell].append(_child(args, cell[1], cell[2], cell[0]))
            _write(args, _results(raw), quiet=True)  # every finished cell is on disk: a stopped run keeps them
    _write(args, _results(raw))


def _results(raw: dict[tuple[str, str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Summaries of the cells that have runs, with ratios against the baseline of their precision."""
    results = []
    for (precision, method, variant), runs in raw.items():
        if not runs or not raw[(precision, BASELINE, "-")]:
            continue
        s = _summarise(runs)
        plain = _summarise(raw[(precision, BASELINE, "-")])
        s.update(method=method, variant=variant, precision=precision,
                 ratio_vs_plain_peft=round(s["step_s_task2"] / plain["step_s_task2"], 3),
                 ratio_taskT_vs_task2=round(s["step_s_taskT"] / s["step_s_task2"], 3))
        results.append(s)
    return results


def _write(args: argparse.Namespace, results: list[dict[str, Any]], *, quiet: bool = False) -> None:
    payload = {
        "benchmark": "train_overhead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": _versions(),
        "settings": {k: getattr(args, k) for k in ("base_model", "tasks", "rows", "batch", "max_length", "epochs",
                                                   "repeats", "methods", "variants", "precisions")},
        "figure": "mean seconds per optimizer step over the epochs after the first; ratios against plain PEFT "
                  "at the same precision",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    if quiet:
        return
    print(f"{'precision':9} {'method':16} {'variant':9} {'step s t2':>9} {'p10-p90':>13} {'vs PEFT':>8} "
          f"{'T / 2':>6} {'pad':>5} {'peak MB':>8}")
    for r in results:
        print(f"{r['precision']:9} {r['method']:16} {r['variant']:9} {r['step_s_task2']:9.3f} "
              f"{r['p10_s_task2']:6.2f}-{r['p90_s_task2']:<6.2f} {r['ratio_vs_plain_peft']:8.3f} "
              f"{r['ratio_taskT_vs_task2']:6.3f} {r['pad']:5.2f} {r['peak_mb']:8.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
