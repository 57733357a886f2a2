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
``+preset`` variant, and runs in a child process of its own (:mod:`cladapt.train.bench_child`),
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
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cladapt.errors import CladaptError, ConfigError, DataError, Issue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    name: str
    train_rows: int | None  # per task; None = all
    test_rows: int | None
    max_tasks: int | None = None  # smoke: only the first tasks of the order
    max_new_tokens: int | None = None  # None: longest label + margin (labels are short)
    mode: str = "both"  # strict exact match + constrained (superficial vs essential forgetting)
    overrides: dict[str, Any] = field(default_factory=dict)


PROFILES = {
    "smoke": Profile("smoke", 16, 16, max_tasks=2, overrides={"train.max_steps": 2, "train.max_length": 256}),
    # quick: all 8 methods of one order fit in about an hour on 2 CPU cores
    "quick": Profile("quick", 160, 60, overrides={"train.max_length": 256, "train.mixed_precision": "auto"}),
    "small": Profile("small", 300, 100, overrides={"train.max_length": 384, "train.mixed_precision": "auto"}),
    "full": Profile("full", None, None, max_new_tokens=50, overrides={"train.mixed_precision": "auto"}),
}


def read_order(data_dir: Path, order: str) -> tuple[list[str], dict[str, list[str]]]:
    """(tasks of ``order``, labels per task) from ``manifest.json``; every task folder must be present."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DataError([Issue(str(data_dir), "no manifest.json: not a CL benchmark folder")])
    manifest = json.loads(manifest_path.read_text())
    orders = manifest.get("orders") or {}
    if order not in orders:
        raise ConfigError([Issue("--order", f"unknown order {order!r}; the manifest has {', '.join(orders)}")])
    tasks = list(orders[order])
    missing = [t for t in tasks if not (data_dir / t / "train.jsonl").is_file() or not (data_dir / t / "test.jsonl").is_file()]
    if missing:
        alt = [o for o, ts in orders.items() if all((data_dir / t / "test.jsonl").is_file() for t in ts)]
        raise DataError([Issue(str(data_dir / t), "task folder (train.jsonl/test.jsonl) is missing") for t in missing],
                        hint=f"orders whose tasks are all present: {', '.join(alt)}")
    labels = {t: list((manifest.get("tasks", {}).get(t) or {}).get("labels") or []) for t in tasks}
    return tasks, labels


def sample_rows(src: Path, n: int | None, dst: Path, *, seed: int = 0) -> Path:
    """A seeded sample of ``n`` lines of ``src`` (file order kept) written to ``dst``."""
    lines = [ln for ln in src.read_text(encoding="utf-8").split("\n") if ln.strip()]
    if n is not None and n < len(lines):
        lines = [lines[i] for i in sorted(random.Random(seed).sample(range(len(lines)), n))]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def machine_info() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
        "cpus": __import__("os").cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(), "git_commit": commit or None,
    }


@dataclass
class BenchSpec:
    data_dir: Path
    order: str
    profile: Profile
    methods: list[str]
    out: Path
    base_model: str | None = None
    overrides: list[str] = field(default_factory=list)  # --set for every method
    fresh: bool = False
    work: Path | None = None  # scratch root (sampled data, one registry per method); default <out>/.cl_work
    ppl_files: list[Path] = field(default_factory=list)  # general text (JSON Lines, 'text') for the ppl column
    ppl_samples: int = 64
    ppl_length: int = 256
    replay_data: Path | None = None  # general texts for the ``+gere-<loss>`` variants


#: GeRe losses a ``+gere-<loss>`` variant may name (methods.md §5)
REPLAY_LOSSES = ("tm", "lf", "kl", "l1", "l2")

#: every cell trains the same LoRA shape, so methods are compared at equal targets and rank (and
#: trainable parameters); a method preset with another shape (RegLoRA's all-layers SEFE preset)
#: runs as the separately labelled ``+preset`` variant
EQUAL_BUDGET = ["lora.r=8", 'lora.target_modules=["q_proj", "v_proj"]']


def parse_cell(name: str, replay_data: Path | None = None) -> tuple[str, list[str]]:
    """``method[+variant...]`` -> (method, ``--set`` overrides of the cell).

    Every cell gets :data:`EQUAL_BUDGET` unless it carries ``+preset`` (the method preset's own
    LoRA shape, e.g. ``reglora+preset``: all 7 linear layers). The other variants put the data
    pipeline on top of a method, each cell in its own registry: ``+asd`` (answer-style
    diversification, base-model explanations) and ``+gere-<loss>`` (general replay of 128 texts x
    128 tokens from ``replay_data``, concatenated with the task rows), e.g. ``seq-lora+asd``,
    ``olora+gere-lf``, ``inc-lora+asd+gere-tm``.
    """
    method, *variants = name.split("+")
    sets: list[str] = [] if "preset" in variants else list(EQUAL_BUDGET)
    for variant in variants:
        if variant == "preset":
            continue
        if variant == "asd":
            sets.append("asd.enabled=true")
        elif variant.startswith("gere-") and variant[5:] in REPLAY_LOSSES:
            if replay_data is None:
                raise ConfigError([Issue("--methods", f"{name}: the {variant} variant replays general text; "
                                         "pass --replay-data FILE (JSON Lines with a 'text' field)")])
            sets += ["replay.enabled=true", f"replay.loss={variant[5:]}", f"replay.texts={replay_data}",
                     "replay.n_replay=128", "replay.max_tokens=128"]
        else:
            known = ", ".join(["preset", "asd", *(f"gere-{loss}" for loss in REPLAY_LOSSES)])
            raise ConfigError([Issue("--methods", f"{name}: unknown variant {variant!r}")], hint=f"variants: {known}")
    return method, sets


def lora_label(lora: dict[str, Any]) -> str:
    """A LoRA shape as the tables show it: ``q,v r8``, ``q,k,v,o,gate,up,down r8``."""
    targets = ",".join(str(t).removesuffix("_proj") for t in lora.get("target_modules") or [])
    return f"{targets} r{lora.get('r')}"


def _cfg(spec: BenchSpec, cell: str) -> Any:
    from cladapt.config import load_config

    method, variant_sets = parse_cell(cell, spec.replay_data)
    sets = [f"{k}={json.dumps(v)}" for k, v in spec.profile.overrides.items()]
    if spec.base_model:
        sets.append(f"base_model={spec.base_model}")
    return load_config(method="lora" if method == "mtl" else method, overrides=[*sets, *variant_sets, *spec.overrides])[0]


def config_changes(recorded: dict[str, Any], cfg: Any, sections: tuple[str, ...] = ("method", "lora", "train")) -> list[str]:
    """``section.key`` of every setting recorded with a cell or version that ``cfg`` now sets otherwise.

    Keys only one side knows (a setting added to cladapt since) are not compared.
    """
    now = cfg.model_dump(mode="json")
    changed = []
    for section in sections:
        old, new = recorded.get(section) or {}, now.get(section) or {}
        changed += [f"{section}.{k}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    return changed


def _stale(what: str, changed: list[str]) -> ConfigError:
    return ConfigError([Issue(what, f"measured with other settings ({', '.join(changed[:6])})")],
                       hint="results of other settings are never mixed: pass --fresh, or another --out and --work-dir")


def _grid(rows: list[Any], tasks: list[str], section: str, field_: str) -> list[list[float | None]]:
    return [[r.score(t, section, field_) for t in tasks] for r in rows]


def run_cell(
    spec: BenchSpec, method: str, tasks: list[str], files: dict[str, Path], sets: dict[str, Any], loaded: Any,
    baseline_cache: dict[str, Any],
) -> dict[str, Any]:
    """Train ``method`` over ``tasks`` (resuming from its registry) and return its matrices."""
    from cladapt.registry.store import Store
    from cladapt.train import metrics as M
    from cladapt.train.history_eval import EvalOptions, HistoryEvaluator
    from cladapt.train.matrix import recorded_rows
    from cladapt.train.run import train_from_config

    cfg = _cfg(spec, method)
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
                raise _stale(f"{method}: {done[k].ref} in {store.root}", changed)
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
        "machine": machine_info(), "command": " ".join(sys.argv),
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
    from cladapt.registry.store import Store
    from cladapt.train import evaluate as E
    from cladapt.train.matrix import recorded_rows

    model, tok, info = loaded
    cfg = _cfg(spec, method)
    store = Store.open(work_dir(spec) / "registries" / method)
    rows = [r for r in recorded_rows(store) if r.status != "rejected"]
    kw = {"max_length": spec.ppl_length, "precision": cfg.train.mixed_precision}
    values: list[float] = []
    base = E.perplexity(model, tok, texts, **kw)
    for t, row in enumerate(rows):
        if row.composition == "sum":
            with tempfile.TemporaryDirectory() as scratch:
                write_merged(store, [store.get(r.ref) for r in rows[: t + 1]], Path(scratch), info.id)
                peft_model: Any = PeftModel.from_pretrained(model, scratch)
        else:
            peft_model, _ = attach(model, store, info, [row.ref])
        try:
            values.append(round(E.perplexity(peft_model, tok, texts, **kw), 4))
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


def work_dir(spec: BenchSpec) -> Path:
    """Scratch of one (order, profile): sampled data and one registry per method (kept for resuming)."""
    return (spec.work or spec.out / ".cl_work") / f"cl_{spec.order}_{spec.profile.name}"


def run_bench(spec: BenchSpec) -> Path:
    """Run (or resume) every method of ``spec``; returns the results JSON path (report written beside it)."""
    import shutil

    from cladapt.adapters import METHODS
    from cladapt.train.evaluate import load_eval_set, load_texts
    from cladapt.train.report import write_report

    tasks, labels = read_order(spec.data_dir, spec.order)
    tasks = tasks[: spec.profile.max_tasks] if spec.profile.max_tasks else tasks
    for m in spec.methods:
        method = parse_cell(m, spec.replay_data)[0]  # unknown variants fail here, before anything runs
        if method != "mtl" and METHODS.get(method).forgetting:  # unknown names fail here, with a did-you-mean
            raise ConfigError([Issue("--methods", f"{m}: a forgetting method (`cladapt forget`), not a CL method")])
        _cfg(spec, m)  # and bad --set overrides, before any cell's process starts
    stem = f"cl_{spec.order}_{spec.profile.name}"
    result_path = spec.out / f"{stem}.json"
    if spec.fresh:
        shutil.rmtree(work_dir(spec), ignore_errors=True)
    results: dict[str, Any] = {} if spec.fresh or not result_path.is_file() else json.loads(result_path.read_text())
    results.update(benchmark="cl", order=spec.order, tasks=tasks, profile=asdict(spec.profile),
                   data_dir=str(spec.data_dir.resolve()), machine=machine_info(), command=" ".join(sys.argv))
    cells: dict[str, Any] = results.setdefault("cells", {})
    for m, cell in cells.items():  # cells from before wall_seconds was recorded
        if cell.get("status") == "done" and "wall_seconds" not in cell and (work_dir(spec) / "registries" / m).is_dir():
            from cladapt.registry.store import Store

            cell["wall_seconds"] = cell_wall_seconds(Store.open(work_dir(spec) / "registries" / m), cell["refs"])
    stale = {m: config_changes(cells[m].get("config") or {}, _cfg(spec, m)) for m in spec.methods
             if (cells.get(m) or {}).get("status") == "done"}
    for m, changed in stale.items():
        if changed:
            raise _stale(f"cell {m} of {result_path}", changed)
    cache: dict[str, Any] = results.setdefault("baseline_cache", {})
    data = work_dir(spec) / "data"
    for t in tasks:  # the cells read the sampled rows from here; bad test rows fail now, before any cell
        sample_rows(spec.data_dir / t / "train.jsonl", spec.profile.train_rows, data / f"{t}.train.jsonl")
        load_eval_set(spec.data_dir / t / "test.jsonl", task=t, labels=labels[t] or None, limit=spec.profile.test_rows)
    todo = [m for m in spec.methods if (cells.get(m) or {}).get("status") != "done" or cells[m].get("tasks") != tasks]
    texts = [t for f in spec.ppl_files for t in load_texts(f, limit=spec.ppl_samples)][: spec.ppl_samples]
    if spec.ppl_files and not texts:
        raise DataError([Issue(str(f), "no non-empty 'text' field to measure perplexity on") for f in spec.ppl_files])
    ppl_todo = [m for m in spec.methods if texts and m not in todo and not cells[m].get("ppl")]
    from cladapt.train.bench_child import run_in_child

    # every cell in its own process (bench_child): memory is bounded per cell and a crash loses one cell
    for m in todo:
        logger.info("=== %s on %s (%s profile, %d tasks) ===", m, spec.order, spec.profile.name, len(tasks))
        cells[m] = run_in_child(spec, "train", [m], cache, command=results["command"])[m]
        _save(result_path, results)
    if ppl_todo:  # cells finished by a run without --ppl-data: one child measures them all
        for m, extra in run_in_child(spec, "ppl", ppl_todo, cache, command=results["command"]).items():
            if extra.get("status") == "failed":
                cells[m]["ppl_error"] = extra["error"]
            else:
                cells[m].update({k: v for k, v in extra.items() if k != "process"})
        _save(result_path, results)
    _save(result_path, results)
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
