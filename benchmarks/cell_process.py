"""Each ``bench cl`` cell runs in its own child process.

A cell (one method over one task order) loads the base model, trains every task and evaluates
every row; in one long-lived process the cells' memory adds up (~9 GB RSS after one ``small`` cell
on the default model) and one crash ends the whole benchmark. So the parent only prepares the data
and merges results, and every cell runs in a fresh interpreter::

    python -m cladapt.bench.cell_process <request.json>

The request (JSON, written by :func:`run_in_child`) names the benchmark spec, the work (``train``:
one cell; ``ppl``: general perplexity for finished cells), the baseline cache and where to write the
result. The child calls the same library code as everything else
(:func:`cladapt.bench.cl.run_cell` -> :func:`cladapt.train.run.train_from_config`) and
writes ``{"status": "ok", "cells": {...}, "baseline_cache": {...}}`` or ``{"status": "failed",
"error": ...}`` atomically; a child killed outright (out of memory) writes nothing, and the parent
records the cell as failed with the exit code and goes on with the next cell.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cladapt.bench.cl_spec import BenchSpec, Profile, work_dir

logger = logging.getLogger(__name__)


def spec_to_json(spec: BenchSpec) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(spec), default=str))


def spec_from_json(raw: dict[str, Any]) -> BenchSpec:
    paths = {k: (Path(raw[k]) if raw.get(k) is not None else None) for k in ("data_dir", "out", "work", "replay_data")}
    profile = Profile(**raw["profile"])
    return BenchSpec(**{**raw, **paths, "profile": profile, "ppl_files": [Path(p) for p in raw.get("ppl_files") or []]})


def run_in_child(spec: BenchSpec, kind: str, cells: list[str], cache: dict[str, Any]) -> dict[str, Any]:
    """Run ``kind`` (``train``: one cell; ``ppl``: perplexity of finished cells) in a fresh process.

    Returns ``{cell: result}`` for every cell; a cell whose process failed or died gets
    ``{"status": "failed", ...}``. ``cache`` (scores of the base model) is updated in place.
    """
    folder = work_dir(spec) / "cells"
    folder.mkdir(parents=True, exist_ok=True)
    stem = cells[0] if kind == "train" else "ppl"
    request, result = folder / f"{stem}.{kind}.request.json", folder / f"{stem}.{kind}.json"
    result.unlink(missing_ok=True)
    request.write_text(json.dumps({
        "spec": spec_to_json(spec), "kind": kind, "cells": cells, "baseline_cache": cache, "result": str(result),
        "log_level": logging.getLogger("cladapt").getEffectiveLevel(),
    }, indent=1))
    logger.info("%s of %s in a child process", kind, ", ".join(cells))
    proc = subprocess.run([sys.executable, "-m", "cladapt.bench.cell_process", str(request)], check=False)
    payload = json.loads(result.read_text()) if result.is_file() else None
    if payload is None or payload.get("status") != "ok":
        error = (payload or {}).get("error") or (
            f"the cell's process ended with exit code {proc.returncode} and wrote no result "
            "(killed: out of memory?)")
        logger.error("%s of %s failed: %s", kind, ", ".join(cells), error)
        return {m: {"status": "failed", "error": error, "returncode": proc.returncode} for m in cells}
    cache.update(payload.get("baseline_cache") or {})
    return dict(payload["cells"])


def _work(req: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cladapt.base_model import load as load_base
    from cladapt.bench.cl import row_perplexities, run_cell
    from cladapt.bench.cl_spec import cell_config, read_order
    from cladapt.evaluation.general_text import general_texts
    from cladapt.evaluation.scoring import load_eval_set

    spec = spec_from_json(req["spec"])
    tasks, labels = read_order(spec.data_dir, spec.order)
    tasks = tasks[: spec.profile.max_tasks] if spec.profile.max_tasks else tasks
    texts = general_texts(spec.ppl_files, spec.ppl_samples)
    first = cell_config(spec, req["cells"][0])
    loaded = load_base(first.base_model, dtype=first.train.dtype, device="cuda" if torch.cuda.is_available() else None)
    cache = req["baseline_cache"]
    out: dict[str, Any] = {}
    for m in req["cells"]:
        if req["kind"] == "train":
            files = {t: work_dir(spec) / "data" / f"{t}.train.jsonl" for t in tasks}
            sets = {t: load_eval_set(spec.data_dir / t / "test.jsonl", task=t, labels=labels[t] or None,
                                     limit=spec.profile.test_rows) for t in tasks}
            cell = run_cell(spec, m, tasks, files, sets, loaded, cache)
            cell["command"] = spec.command
            if texts:
                cell.update(row_perplexities(spec, m, loaded, texts))
        else:
            cell = row_perplexities(spec, m, loaded, texts)
        # Linux reports ru_maxrss in KiB: the cell's peak memory, bounded by its own process
        cell["process"] = {"pid": os.getpid(), "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        out[m] = cell
    return {"status": "ok", "cells": out, "baseline_cache": cache}


def main(argv: list[str]) -> int:
    """The child: read the request, do the work, write the result (also on failure)."""
    req = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("cladapt").setLevel(int(req.get("log_level", logging.INFO)))
    try:
        payload, rc = _work(req), 0
    except Exception as exc:  # reported to the parent, which records the cell as failed
        logger.exception("bench cell %s failed", ", ".join(req["cells"]))
        payload, rc = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}, 1
    result = Path(req["result"])
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(result)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
