"""Benchmark: GeRe replay and ASD on two CL-benchmark tasks in sequence (part 5 of the data-pipeline issue).

For each *condition* (no replay; GeRe ``tm``; GeRe ``lf``; ASD without replay; more in
``CONDITIONS``) a fresh registry trains task 1 then task 2 (default ``dbpedia`` then ``amazon``,
``seq-lora`` so the second task can overwrite the first) and, right after each task, measures:

* accuracy on the test rows of every task seen so far (strict exact match, constrained
  log-likelihood over labels, format rate: ``cladapt.evaluation.scoring``);
* general-text perplexity on held-out texts of ``shared/data/general-replay`` that replay never
  uses (C4 rows after the replay rows, and Wikipedia articles);
* time: training runtime, extension time (ASD conversion / replay set-up) and evaluation time.

The ``base`` stage scores the untouched base model and records the GeRe statistics once (timed);
every replay condition reuses that record. Data is read from ``$CLADAPT_SHARED/data`` (default:
the ``shared`` folder beside the repository); only seeded row samples are written, to the
scratch folder ``bench/work/replay_asd`` (git-ignored).

Resumable: results are saved after every stage and every task; a rerun skips what is stored for
the same settings (``--fresh`` starts over). Run one stage at a time with ``--stages``.

    python bench/replay_asd.py                      # all stages -> bench/results/replay_asd.json
    python bench/replay_asd.py --stages base,none   # just these
    python bench/replay_asd.py --smoke              # tiny random model, a few rows: proves the pipeline
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from cladapt.bench.cl_spec import sample_rows

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLADAPT_SHARED", ROOT.parent / "shared"))
logger = logging.getLogger("bench.replay_asd")

#: condition -> config overrides (on top of the common training settings)
CONDITIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "tm": {"replay.enabled": True, "replay.loss": "tm"},
    "lf": {"replay.enabled": True, "replay.loss": "lf"},
    "asd": {"asd.enabled": True, "asd.generator": "base"},
    # not run by default:
    "tm-dy": {"replay.enabled": True, "replay.loss": "tm", "replay.weight": "dy"},
    "kl": {"replay.enabled": True, "replay.loss": "kl"},
    "tm-bi": {"replay.enabled": True, "replay.loss": "tm", "replay.ratio": 0.25},
    "asd-none": {"asd.enabled": True, "asd.generator": "none"},
    "asd+tm": {"asd.enabled": True, "asd.generator": "base", "replay.enabled": True, "replay.loss": "tm"},
}
DEFAULT_CONDITIONS = ["none", "tm", "lf", "asd"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="base," + ",".join(DEFAULT_CONDITIONS),
                   help=f"comma-separated: base and conditions from {', '.join(CONDITIONS)}")
    p.add_argument("--tasks", default="dbpedia,amazon", help="two tasks of the CL benchmark, in training order")
    p.add_argument("--method", default="seq-lora")
    p.add_argument("--base-model", default=None, help="default: smollm2-135m-instruct (--smoke: a tiny random model)")
    p.add_argument("--train-rows", type=int, default=200)
    p.add_argument("--test-rows", type=int, default=100)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--replay-n", type=int, default=128, help="C4 rows replayed (the first ones)")
    p.add_argument("--replay-tokens", type=int, default=128)
    p.add_argument("--ppl-c4", type=int, default=32, help="held-out C4 rows (after the replay rows)")
    p.add_argument("--ppl-wiki", type=int, default=8, help="held-out Wikipedia articles")
    p.add_argument("--ppl-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every condition (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/replay_asd.json")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "replay_asd")
    p.add_argument("--fresh", action="store_true", help="forget stored results and registries of these settings")
    p.add_argument("--smoke", action="store_true", help="tiny random model and a handful of rows")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_rows, args.test_rows, args.max_steps, args.batch_size = 12, 6, 2, 4
        args.replay_n, args.replay_tokens, args.ppl_c4, args.ppl_wiki, args.ppl_tokens = 6, 24, 3, 2, 32
        args.max_length = 256
        args.work = args.work.with_name(args.work.name + "-smoke")
    args.out = args.out or (args.work / "replay_asd.smoke.json" if args.smoke else ROOT / "bench" / "results" / "replay_asd.json")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a stored result depends on (a change invalidates stored stages)."""
    keys = ("tasks", "method", "base_model", "train_rows", "test_rows", "epochs", "max_steps", "batch_size",
            "max_length", "replay_n", "replay_tokens", "ppl_c4", "ppl_wiki", "ppl_tokens", "seed", "overrides", "smoke")
    return {k: getattr(args, k) for k in keys}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from cladapt.base_model import DEFAULT_BASE_MODEL

        self.args = args
        self.tasks = args.tasks.split(",")
        if len(self.tasks) != 2:
            raise SystemExit("--tasks needs exactly two tasks")
        self.data = SHARED / "data" / "cl-benchmark"
        general = SHARED / "data" / "general-replay"
        c4 = read_jsonl(general / "c4.jsonl")
        if args.replay_n + args.ppl_c4 > len(c4):
            raise SystemExit(f"--replay-n + --ppl-c4 must be <= {len(c4)} C4 rows")
        self.replay_texts = [{"text": r["text"], "id": r["id"], "source": "c4"} for r in c4[: args.replay_n]]
        self.heldout = {
            "c4": [r["text"] for r in c4[args.replay_n : args.replay_n + args.ppl_c4]],
            "wiki": [r["text"] for r in read_jsonl(general / "wikipedia.jsonl")[: args.ppl_wiki]],
        }
        if args.smoke and not args.base_model:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny import build_tiny

            args.base_model = str(build_tiny(args.work / "tiny-model"))
        self.base_model = args.base_model or DEFAULT_BASE_MODEL
        self.results: dict[str, Any] = {}
        self._loaded: Any = None

    # ------------------------------------------------------------------ plumbing

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            import torch

            from cladapt.base_model import load

            # the Trainer moves the model to the accelerator anyway; load it there so that the
            # base-stage scoring and recording run there too
            self._loaded = load(self.base_model, device="cuda" if torch.cuda.is_available() else None)
        return self._loaded

    def load_results(self) -> None:
        out = self.args.out
        stored = json.loads(out.read_text()) if out.is_file() and not self.args.fresh else {}
        if stored and stored.get("settings") != settings(self.args):
            raise SystemExit(f"{out} holds results for other settings; pass --fresh (or --out) to start over")
        if self.args.fresh:
            shutil.rmtree(self.args.work / "registries", ignore_errors=True)
        self.results = stored or {"benchmark": "replay_asd", "settings": settings(self.args), "stages": {}}

    def save(self) -> None:
        from cladapt.bench.provenance import machine_info

        self.results.update(machine=machine_info(), command=" ".join([sys.executable, *sys.argv]),
                            base_model=self.base_model, data=str(SHARED / "data"))
        self.results["summary"] = summary(self.results)
        out = self.args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(out)

    def files(self) -> dict[str, Path]:
        d = self.args.work / "data"
        return {t: sample_rows(self.data / t / "train.jsonl", self.args.train_rows, d / f"{t}.train.jsonl", seed=self.args.seed)
                for t in self.tasks}

    def evalsets(self) -> dict[str, Any]:
        from cladapt.evaluation.scoring import load_eval_set

        labels = {t: json.loads((self.data / "labels" / f"{t}.json").read_text()) for t in self.tasks}
        return {t: load_eval_set(self.data / t / "test.jsonl", task=t, labels=labels[t], limit=self.args.test_rows,
                                 seed=self.args.seed) for t in self.tasks}

    def measure(self, model: Any, tasks: list[str]) -> dict[str, Any]:
        from cladapt.evaluation.scoring import evaluate, perplexity

        tok = self.loaded[1]
        started = time.time()
        out: dict[str, Any] = {"accuracy": {}, "ppl": {}}
        for t in tasks:
            r = evaluate(model, tok, self.sets[t], mode="both", max_new_tokens=None, batch_size=16)
            out["accuracy"][t] = {"exact_match": round(r.exact_match or 0.0, 2), "constrained": r.constrained,
                                  "format_rate": r.format_rate, "rows": r.n}
        for name, texts in self.heldout.items():
            out["ppl"][name] = round(perplexity(model, tok, texts, max_length=self.args.ppl_tokens), 4)
        out["seconds"] = round(time.time() - started, 2)
        return out

    # ------------------------------------------------------------------ stages

    def stage_base(self) -> dict[str, Any]:
        from cladapt.registry.store import Store
        from cladapt.train.replay import record, save_record

        model, tok, info = self.loaded
        scores = self.measure(model, self.tasks)
        started = time.time()
        rec = record(model, tok, self.replay_texts, base=info, n=self.args.replay_n,
                     max_tokens=self.args.replay_tokens, source={"kind": "file", "path": "general-replay/c4.jsonl"})
        seconds = round(time.time() - started, 2)
        save_record(Store.init(self.args.work / "registries" / "_record", exist_ok=True), rec)
        return {"status": "done", **scores, "record": {"seconds": seconds, "n": rec.meta["n"], "tokens": rec.meta["tokens"],
                                                       "width": rec.meta["width"]}}

    def stage_condition(self, name: str, stored: dict[str, Any]) -> dict[str, Any]:
        from cladapt.config import load_config
        from cladapt.registry.store import Store
        from cladapt.train.extensions import build_extensions
        from cladapt.train.replay import load_record, save_record
        from cladapt.train.run import train_task

        a = self.args
        sets = {"train.batch_size": a.batch_size, "train.max_length": a.max_length, "train.seed": a.seed,
                "train.epochs": a.epochs, "train.max_steps": a.max_steps, "train.logging_steps": 10,
                "train.save_steps": 10_000, **CONDITIONS[name]}
        overrides = [f"base_model={self.base_model}", *(f"{k}={json.dumps(v)}" for k, v in sets.items()), *a.overrides]
        cfg, _ = load_config(method=a.method, overrides=overrides)
        result = stored if stored.get("tasks") else {"status": "running", "overrides": sets, "tasks": {}}
        folder = a.work / "registries" / name
        if folder.exists() and set(Store.open(folder).tasks()) != set(result["tasks"]):
            # killed between a commit and saving its scores: redo the condition from scratch
            shutil.rmtree(folder)
            result = {"status": "running", "overrides": sets, "tasks": {}}
        store = Store.init(folder, exist_ok=True)
        if cfg.replay.enabled and load_record(store, self.loaded[2]) is None:
            shared = load_record(Store.open(a.work / "registries" / "_record"), self.loaded[2])
            if shared is None:
                raise SystemExit("run the base stage first (it records the replay statistics)")
            save_record(store, shared)
        for k, task in enumerate(self.tasks):
            if task in result["tasks"]:
                continue
            timing: dict[str, float] = {}
            exts = [_timed(e, timing) for e in build_extensions(cfg, store)]
            measured: dict[str, Any] = {}

            def after(trained: Any, seen: list[str] = self.tasks[: k + 1], out: dict = measured) -> None:
                out.update(self.measure(trained.model, seen))

            logger.info("[%s] training %s (%d/2)", name, task, k + 1)
            rec = train_task(store, task, [str(self.train_files[task])], cfg, extensions=exts,
                             after_train=after, loaded=self.loaded)
            stats = rec.manifest.train_stats
            result["tasks"][task] = {
                **measured, "ref": str(rec.ref), "steps": stats.get("steps"),
                "train_runtime": stats.get("train_runtime"), "extension_seconds": round(timing.get("total", 0.0), 2),
                "sidecar_metrics": {k2: v for k2, v in rec.manifest.metrics.items() if k2.startswith(("gere", "asd"))},
            }
            self.results["stages"][name] = result
            self.save()
        result["status"] = "done"
        return result

    def run(self) -> Path:
        self.load_results()
        self.train_files = self.files()
        self.sets = self.evalsets()
        stages = [s for s in self.args.stages.split(",") if s]
        unknown = [s for s in stages if s != "base" and s not in CONDITIONS]
        if unknown:
            raise SystemExit(f"unknown stage(s) {unknown}; known: base, {', '.join(CONDITIONS)}")
        for stage in stages:
            stored = self.results["stages"].get(stage, {})
            if stored.get("status") == "done":
                logger.info("%s: stored, skipped", stage)
                continue
            logger.info("=== stage %s ===", stage)
            self.results["stages"][stage] = self.stage_base() if stage == "base" else self.stage_condition(stage, stored)
            self.save()
        self.save()
        return self.args.out


def _timed(ext: Any, timing: dict[str, float]) -> Any:
    def run(ctx: Any) -> None:
        started = time.time()
        ext(ctx)
        timing["total"] = timing.get("total", 0.0) + time.time() - started

    return run


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage: first-task accuracy before/after the second task, perplexities, times."""
    tasks = results["settings"]["tasks"].split(",")
    rows = []
    base = results["stages"].get("base", {})
    if base.get("status") == "done":
        rows.append({"stage": "base", **{f"{t}_em": base["accuracy"][t]["exact_match"] for t in tasks},
                     **{f"ppl_{k}": v for k, v in base["ppl"].items()}, "record_seconds": base["record"]["seconds"]})
    for name, st in results["stages"].items():
        if name == "base" or len(st.get("tasks", {})) < 2:
            continue
        t1, t2 = (st["tasks"][t] for t in tasks)
        first = tasks[0]
        rows.append({
            "stage": name,
            f"{first}_em_after_{first}": t1["accuracy"][first]["exact_match"],
            f"{first}_em_after_{tasks[1]}": t2["accuracy"][first]["exact_match"],
            f"{first}_constrained_after_{tasks[1]}": t2["accuracy"][first]["constrained"],
            f"{first}_format_after_{tasks[1]}": t2["accuracy"][first]["format_rate"],
            f"{tasks[1]}_em": t2["accuracy"][tasks[1]]["exact_match"],
            **{f"ppl_{k}": v for k, v in t2["ppl"].items()},
            "train_seconds": round(sum((x.get("train_runtime") or 0.0) for x in (t1, t2)), 1),
            "extension_seconds": round(t1["extension_seconds"] + t2["extension_seconds"], 1),
            "steps": (t1["steps"] or 0) + (t2["steps"] or 0),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "datasets", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    out = Bench(args).run()
    results = json.loads(out.read_text())
    for row in results["summary"]:
        print(json.dumps(row))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
