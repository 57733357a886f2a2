"""``cladapt bench cl``: the continual-learning benchmark (O-LoRA's CL_Benchmark, methods.md §11, §13).

For one task order (read from the benchmark folder's ``manifest.json``; no task list is assumed)
and a list of methods, every method trains the tasks in order into its own registry, and after
each task the new version is scored on every task seen so far and on the next one (``R[t][t+1]``,
for FWT; tasks further ahead enter no metric and are skipped, which saves a fifth of the
evaluation) with the same evaluation as ``cladapt train --eval-on-history``. Besides the CL methods:

* ``mtl``: one fresh ``lora`` adapter trained on the shuffled union of all tasks so far (the
  joint-training upper bound), evaluated as one model answering every task;
* ``lora``: a fresh adapter per task with oracle task ids (``R[T][i] = R[i][i]``; the isolation
  upper bound).

Every cell trains the same LoRA shape (:data:`EQUAL_BUDGET`: q_proj/v_proj, r 8) unless it is a
``+preset`` variant, and runs in a child process of its own (:mod:`cladapt.bench.cell_process`),
training every task through :func:`cladapt.train.run.train_from_config` like ``cladapt train``.

Resumable: a (order, method) cell whose result is in the JSON is skipped, and inside a cell every
task already committed to that method's registry (under the work folder, ``bench/work`` from the
CLI) is reused. Results go to
``<out>/cl_<order>_<profile>.json`` (with machine, versions and command) and a report to
``<out>/cl_<order>_<profile>/index.html``. Profiles: ``smoke`` (2 tasks, 16 rows, 2 steps: proves the
pipeline), ``quick`` (160 / 60), ``small`` (300 train / 100 test rows per task), ``full`` (every row:
1000 / 500). Every profile but ``smoke`` sets ``train.mixed_precision: auto``: bf16 autocast on CUDA
and on CPUs with AMX/AVX512-BF16 (3x faster evaluation, 2x faster steps on such a CPU), recorded
with every score; ``--set train.mixed_precision=no`` runs the benchmark in fp32.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cladapt.bench.cl_spec import (
    BenchSpec,
    cell_config,
    config_changes,
    lora_label,
    parse_cell,
    read_order,
    sample_rows,
    stale_error,
    work_dir,
)
from cladapt.bench.provenance import machine_info
from cladapt.errors import CladaptError, ConfigError, DataError, Issue

logger = logging.getLogger(__name__)


def _grid(rows: list[Any], tasks: list[str], section: str, field_: str) -> list[list[float | None]]:
    return [[r.score(t, section, field_) for t in tasks] for r in rows]


def run_cell(
    spec: BenchSpec, method: str, tasks: list[str], files: dict[str, Path], sets: dict[str, Any], loaded: Any,
    baseline_cache: dict[str, Any],
) -> dict[str, Any]:
    """Train ``method`` over ``tasks`` (resuming from its registry) and return its matrices."""
    from cladapt.evaluation import metrics as M
    from cladapt.evaluation.accuracy_matrix import recorded_rows
    from cladapt.evaluation.history_eval import EvalOptions, HistoryEvaluator
    from cladapt.registry.store import Store
    from cladapt.train.run import train_from_config

    cfg = cell_config(spec, method)
    started = time.time()
    store = Store.init(work_dir(spec) / "registries" / method, exist_ok=True)
    # row k scores tasks 0..k+1: the seen ones and the next (R[k][k+1] is FWT's term, no "before" pass needed)
    options = EvalOptions(history=True, mode=spec.profile.mode, max_new_tokens=spec.profile.max_new_tokens,
                          batch_size=cfg.eval.batch_size, before=False, precision=cfg.train.mixed_precision)
    for k, task in enumerate(tasks):
        done = [r for r in recorded_rows(store) if r.status != "rejected"]
        if len(done) > k:
            changed = config_changes(store.get(done[k].ref).manifest.config, cfg, ("method", "lora", "train", "asd", "replay"))
            if changed:
                raise stale_error(f"{method}: {done[k].ref} in {store.root}", changed)
            logger.info("[%s] %d/%d %s: already trained, reused", method, k + 1, len(tasks), task)
            continue
        mtl = parse_cell(method, spec.replay_data)[0] == "mtl"
        name = "mtl" if mtl else task
        data = [str(files[t]) for t in tasks[: k + 1]] if mtl else [str(files[task])]
        scored = {t: sets[t] for t in tasks[: k + 2]}
        evaluator = HistoryEvaluator(store, cfg, name, None, options, sets=scored, baseline_cache=baseline_cache,
                                     composition="single" if mtl else None)
        logger.info("[%s] %d/%d: training %s on %s", method, k + 1, len(tasks), name, ", ".join(Path(d).stem for d in data))
        # the library's train action: the variant's ASD / replay run exactly as `cladapt train` runs them
        rec = train_from_config(store, name, data, cfg, loaded=loaded, evaluator=evaluator)
        scores = {t: e.get("score") for t, e in rec.manifest.metrics["eval"]["scores"].items()}
        logger.info("[%s] %s scores: %s", method, rec.ref, scores)
    rows = [r for r in recorded_rows(store) if r.status != "rejected"][: len(tasks)]
    R = _grid(rows, tasks, "scores", "score")
    b = [rows[-1].score(t, "baseline") for t in tasks]
    constrained = _grid(rows, tasks, "scores", "constrained")
    b_con = [rows[-1].score(t, "baseline", "constrained") for t in tasks]
    recs = {str(r.ref): r for r in store.list()}
    return {
        "status": "done", "method": method, "tasks": tasks, "refs": [r.ref for r in rows],
        "R": R, "b": b, "format_rate": _grid(rows, tasks, "scores", "format_rate"),
        "constrained": constrained if any(v is not None for row in constrained for v in row) else [],
        "b_constrained": b_con, "metrics": M.summary(R, b),
        "metrics_constrained": M.summary(constrained, b_con) if constrained and constrained[0][0] is not None else None,
        # Trainer's own runtime: the version's wall time also holds the evaluation done before commit
        "train_seconds": round(sum(_train_seconds(recs[r.ref]) for r in rows), 1),
        "eval_seconds": round(sum(r.payload.get("seconds", 0.0) for r in rows), 1),
        "wall_seconds": cell_wall_seconds(store, [r.ref for r in rows]),
        "cell_seconds_this_run": round(time.time() - started, 1),
        "lora_label": lora_label(cfg.lora.model_dump(mode="json")),
        "config": {"method": cfg.method.model_dump(mode="json"), "lora": cfg.lora.model_dump(mode="json"),
                   "train": cfg.train.model_dump(mode="json"), "base_model": cfg.base_model},
        "machine": machine_info(), "command": spec.command,
    }


def row_perplexities(spec: BenchSpec, method: str, loaded: Any, texts: list[str]) -> dict[str, Any]:
    """General perplexity of the model after each task of a finished cell, and of the base model.

    Rebuilt from the cell's registry, so it can be added to cells that ran without it: after task
    ``t`` the model is the sum of versions ``1..t`` (sum methods), or version ``t`` itself (one
    continued adapter, ``mtl``, and the oracle's newest task adapter).
    """
    import tempfile

    from peft import PeftModel

    from cladapt.adapters.loading import attach, write_merged
    from cladapt.evaluation.accuracy_matrix import recorded_rows
    from cladapt.evaluation.general_text import perplexity
    from cladapt.registry.store import Store

    model, tok, info = loaded
    cfg = cell_config(spec, method)
    store = Store.open(work_dir(spec) / "registries" / method)
    rows = [r for r in recorded_rows(store) if r.status != "rejected"]
    kw = {"max_length": spec.ppl_length, "precision": cfg.train.mixed_precision}
    values: list[float] = []
    base = perplexity(model, tok, texts, **kw)
    for t, row in enumerate(rows):
        if row.composition == "sum":
            with tempfile.TemporaryDirectory() as scratch:
                write_merged(store, [store.get(r.ref) for r in rows[: t + 1]], Path(scratch), info.id)
                peft_model: Any = PeftModel.from_pretrained(model, scratch)
        else:
            peft_model, _ = attach(model, store, info, [row.ref])
        try:
            values.append(round(perplexity(peft_model, tok, texts, **kw), 4))
        finally:
            peft_model.unload()
    logger.info("[%s] general perplexity after each task: %s (base model %.3f)", method, values, base)
    return {"ppl": values, "ppl_base": round(base, 4),
            "ppl_data": {"files": [str(f) for f in spec.ppl_files], "samples": len(texts), "max_length": spec.ppl_length}}


def cell_wall_seconds(store: Any, refs: list[str]) -> float:
    """Wall time of a cell: every version's whole run (data, training, evaluation, commit), resumes included."""
    return round(sum(float(store.get(ref).manifest.train_stats.get("wall_seconds", 0.0)) for ref in refs), 1)


def _train_seconds(rec: Any) -> float:
    stats = rec.manifest.train_stats
    return float(stats.get("train_runtime", stats.get("wall_seconds", 0.0)))


def _check_cells(spec: BenchSpec) -> None:
    """Unknown methods or variants, forgetting methods and bad ``--set`` overrides fail before any cell runs."""
    from cladapt.adapters import METHODS

    for m in spec.methods:
        method = parse_cell(m, spec.replay_data)[0]  # unknown variants fail here, before anything runs
        if method != "mtl" and METHODS.get(method).forgetting:  # unknown names fail here, with a did-you-mean
            raise ConfigError([Issue("--methods", f"{m}: a forgetting method (`cladapt forget`), not a CL method")])
        cell_config(spec, m)  # and bad --set overrides, before any cell's process starts


def _load_results(spec: BenchSpec, tasks: list[str], result_path: Path) -> dict[str, Any]:
    """The results so far (empty with ``--fresh``), refusing finished cells measured with other settings."""
    import shutil

    if spec.fresh:
        shutil.rmtree(work_dir(spec), ignore_errors=True)
    results: dict[str, Any] = {} if spec.fresh or not result_path.is_file() else json.loads(result_path.read_text())
    results.update(benchmark="cl", order=spec.order, tasks=tasks, profile=asdict(spec.profile),
                   data_dir=str(spec.data_dir.resolve()), machine=machine_info(), command=spec.command)
    cells: dict[str, Any] = results.setdefault("cells", {})
    for m, cell in cells.items():  # cells from before wall_seconds was recorded
        if cell.get("status") == "done" and "wall_seconds" not in cell and (work_dir(spec) / "registries" / m).is_dir():
            from cladapt.registry.store import Store

            cell["wall_seconds"] = cell_wall_seconds(Store.open(work_dir(spec) / "registries" / m), cell["refs"])
    for m in spec.methods:
        if (cells.get(m) or {}).get("status") == "done":
            changed = config_changes(cells[m].get("config") or {}, cell_config(spec, m))
            if changed:
                raise stale_error(f"cell {m} of {result_path}", changed)
    return results


def _run_cells(spec: BenchSpec, tasks: list[str], results: dict[str, Any], result_path: Path, texts: list[str]) -> None:
    """Every unfinished cell in a process of its own; then general perplexity for finished cells without it."""
    from cladapt.bench.cell_process import run_in_child

    cells, cache = results["cells"], results.setdefault("baseline_cache", {})
    todo = [m for m in spec.methods if (cells.get(m) or {}).get("status") != "done" or cells[m].get("tasks") != tasks]
    ppl_todo = [m for m in spec.methods if texts and m not in todo and not cells[m].get("ppl")]
    # every cell in its own process (cell_process): memory is bounded per cell and a crash loses one cell
    for m in todo:
        logger.info("=== %s on %s (%s profile, %d tasks) ===", m, spec.order, spec.profile.name, len(tasks))
        cells[m] = run_in_child(spec, "train", [m], cache)[m]
        _save(result_path, results)
    if ppl_todo:  # cells finished by a run without --ppl-data: one child measures them all
        for m, extra in run_in_child(spec, "ppl", ppl_todo, cache).items():
            if extra.get("status") == "failed":
                cells[m]["ppl_error"] = extra["error"]
            else:
                cells[m].update({k: v for k, v in extra.items() if k != "process"})
        _save(result_path, results)
    _save(result_path, results)


def run_bench(spec: BenchSpec) -> Path:
    """Run (or resume) every method of ``spec``; returns the results JSON path (report written beside it)."""
    from cladapt.evaluation.general_text import general_texts
    from cladapt.evaluation.report import write_report
    from cladapt.evaluation.scoring import load_eval_set

    tasks, labels = read_order(spec.data_dir, spec.order)
    tasks = tasks[: spec.profile.max_tasks] if spec.profile.max_tasks else tasks
    _check_cells(spec)
    stem = f"cl_{spec.order}_{spec.profile.name}"
    result_path = spec.out / f"{stem}.json"
    results = _load_results(spec, tasks, result_path)
    data = work_dir(spec) / "data"
    for t in tasks:  # the cells read the sampled rows from here; bad test rows fail now, before any cell
        sample_rows(spec.data_dir / t / "train.jsonl", spec.profile.train_rows, data / f"{t}.train.jsonl")
        load_eval_set(spec.data_dir / t / "test.jsonl", task=t, labels=labels[t] or None, limit=spec.profile.test_rows)
    texts = general_texts(spec.ppl_files, spec.ppl_samples)
    if spec.ppl_files and not texts:
        raise DataError([Issue(str(f), "no non-empty 'text' field to measure perplexity on") for f in spec.ppl_files])
    _run_cells(spec, tasks, results, result_path, texts)
    cells = results["cells"]
    runs = {m: cells[m] for m in spec.methods if m in cells and cells[m].get("status") == "done"}
    write_report({"title": f"CL benchmark {spec.order} ({spec.profile.name} profile)",
                  "meta": {"tasks": " -> ".join(tasks), "command": results["command"], "results": str(result_path),
                           "machine": results["machine"]}, "runs": runs}, spec.out / stem)
    failed = {m: cells[m]["error"] for m in spec.methods if (cells.get(m) or {}).get("status") == "failed"}
    if failed:
        raise CladaptError(
            f"{len(failed)} of {len(spec.methods)} cells failed (the others are in {result_path}): "
            + "; ".join(f"{m}: {e}" for m, e in failed.items()),
            hint="the same command re-runs only the failed cells (finished tasks inside them are reused)",
        )
    return result_path


def _save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)
