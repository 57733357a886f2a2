"""Routing accuracy, latency and scale of cladapt's routers on the CL benchmark pack.

Three measurements, each written to ``bench/results/routing*.json`` with machine, versions and command:

``accuracy``  per request, per router, on the 5 standard tasks and on every long-sequence task
              present in the pack (12 of the 15), with the instruction and on the input alone,
              amazon and yelp apart and merged, with confusion matrices.
              * Without ``--registry``, candidates are built from each task's training rows alone
                (a signature per task: base-model and encoder spaces, no adapter), which is enough
                for the feature routers (``dtkr`` in either space, any settings).
              * With ``--registry`` (versions trained on the same tasks, e.g. a ``bench cl`` lora cell),
                every router runs through a :class:`RoutingSession`, adapters included (``mos``, ``arrow``).
``latency``   (needs ``--registry``) milliseconds per single request for each router, against a
              32-token greedy generation with the routed adapter on the same model in the same run.
``scale``     DTKR routing time per request with N synthetic tasks (keys only; query embedding apart).
``cl``        ``lora+<router>`` cells of a finished ``bench cl`` run: its lora versions served through a
              router after every task, scored like the other cells (AA/BWT/FWT beside the oracle).

    python bench/routing.py accuracy --routers "dtkr,dtkr:groups=1:keys=1,dtkr:space=base"
    python bench/routing.py accuracy --registry bench/work/order1-small/lora --routers dtkr,mos,arrow --sets standard
    python bench/routing.py latency --registry REG --routers dtkr,mos,arrow
    python bench/routing.py scale --tasks 1000
    python bench/routing.py cl --results bench/results/cl_order1_small.json --work bench/work/cl_order1_small \\
        --routers dtkr,mos,arrow
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLADAPT_SHARED", ROOT.parent / "shared")) / "data" / "cl-benchmark"
STANDARD = ["agnews", "amazon", "dbpedia", "yahoo", "yelp"]


def machine() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def parse_router(spec: str) -> tuple[str, str, list[str]]:
    """``dtkr:groups=1:keys=1`` -> (label, router name, ["groups=1", "keys=1"])."""
    name, *settings = spec.split(":")
    return spec, name, settings


def long_tasks(data_dir: Path) -> list[str]:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    present = {p.name for p in data_dir.iterdir() if (p / "test.jsonl").is_file()}
    order = [t for t in manifest.get("orders", {}).get("long", []) if t in present]
    return order or sorted(present)


# ------------------------------------------------------------------ accuracy, signature-only candidates


class DiskCached:
    """A FeatureSource wrapper that keeps every embedding call's result on disk (re-runs, other modes).

    Keyed by the space, adapter and the exact texts, so a changed sample or model id is a new entry.
    """

    def __init__(self, inner: Any, folder: Path, model_id: str) -> None:
        self.inner, self.folder, self.model_id = inner, folder, model_id
        folder.mkdir(parents=True, exist_ok=True)

    def spaces(self) -> frozenset[str]:
        return self.inner.spaces()

    def embed(self, space: str, texts: list[str], *, adapter: str | None = None) -> Any:
        import hashlib

        from safetensors.torch import load_file, save_file

        key = hashlib.sha256(json.dumps([self.model_id, space, adapter, list(texts)]).encode()).hexdigest()[:32]
        path = self.folder / f"{key}.safetensors"
        if path.is_file():
            return load_file(str(path))["x"]
        out = self.inner.embed(space, texts, adapter=adapter)
        save_file({"x": out.contiguous()}, str(path))
        return out


def signature_views(feats: Any, data_dir: Path, tasks: list[str], *, instruction: bool,
                    rows: int, cache: dict[Any, Any], need_base: bool) -> list[Any]:
    """One in-memory candidate per task: a signature of its training rows (base + encoder spaces)."""
    import torch

    from cladapt.features import Signature, sample_indices
    from cladapt.route_eval import benchmark_rows
    from cladapt.serve.routers.base import TaskView

    views = []
    for task in tasks:
        key = (task, instruction)
        if key not in cache:
            train = benchmark_rows(data_dir, [task], split="train", instruction=instruction)
            keep = sample_indices(len(train), k=rows, seed=0)
            texts = [train[i].text for i in keep]
            labels = [train[i].example.answer for i in keep]  # type: ignore[union-attr]
            # the base model's space costs a 135M-parameter pass per prompt: only when a router reads it
            base = feats.embed("base", texts) if need_base else torch.zeros(len(texts), 1)
            enc = feats.embed("encoder", texts) if "encoder" in feats.spaces() else None
            cache[key] = Signature(base=base, labels=labels, encoder=enc)
            print(f"  signature {task} ({'instruction' if instruction else 'input'}): {len(texts)} rows", flush=True)
        views.append(TaskView(ref=f"{task}@1", task=task, version=1, peft_name=f"{task}__v1", composition="route",
                              lora={}, signature=cache[key]))
    return views


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from cladapt.base_model import load
    from cladapt.features import FeatureExtractor, load_encoder
    from cladapt.route_eval import benchmark_rows
    from cladapt.serve.routers import ROUTERS, QueryBatch
    from cladapt.serve.routers.accuracy import routing_accuracy
    from cladapt.serve.routers.state import router_config

    sets = {"standard": STANDARD, "long": long_tasks(args.data_dir)}
    if args.registry is not None:  # route among the registry's tasks only; say which of a set are left out
        from cladapt.registry.store import Store

        have = set(Store.open(args.registry).tasks())
        for key, tasks in sets.items():
            if set(tasks) - have:
                print(f"{key}: no version of {sorted(set(tasks) - have)} in {args.registry}; left out", flush=True)
            sets[key] = [t for t in tasks if t in have]
    results: list[dict[str, Any]] = []
    need_base = any("space=base" in spec or spec.split(":")[0] == "mos" for spec in args.routers.split(","))
    if args.registry is None:
        model, tok, _ = load(args.base_model)
        encoder = load_encoder()
        feats = DiskCached(FeatureExtractor(model, tok, encoder=encoder, batch_size=32), args.embedding_cache,
                           args.base_model)
        sig_cache: dict[Any, Any] = {}
    for mode in args.modes.split(","):
        instruction = mode == "instruction"
        all_tasks = list(dict.fromkeys(t for s in args.sets.split(",") for t in sets[s]))
        queries = benchmark_rows(args.data_dir, all_tasks, instruction=instruction, limit=args.test_rows)
        if args.registry is None:
            batch = QueryBatch([q.text for q in queries], feats)  # embeddings shared by every router and set
        for set_name in args.sets.split(","):
            tasks = sets[set_name]
            idx = [i for i, q in enumerate(queries) if q.task in tasks]
            for spec in args.routers.split(","):
                label, name, settings = parse_router(spec)
                cfg = router_config(name, settings)
                started = time.perf_counter()
                if args.registry is None:
                    router = ROUTERS.get(name)(cfg)
                    router.fit(signature_views(feats, args.data_dir, tasks, instruction=instruction,
                                               rows=args.train_rows, cache=sig_cache, need_base=need_base))
                    fitted = time.perf_counter()
                    routes = router.route(_Rows(batch, idx))
                else:
                    routes, fitted = _session_routes(args, name, cfg, [queries[i] for i in idx])
                elapsed = time.perf_counter() - fitted
                acc = routing_accuracy([queries[i].task for i in idx], [r.task for r in routes])
                results.append({"set": set_name, "tasks": tasks, "mode": mode, "router": label,
                                "config": cfg.model_dump(mode="json"),
                                **acc.to_json(), "route_ms_per_request_incl_cached_embeddings": round(1000 * elapsed / len(idx), 3),
                                "fit_seconds": round(fitted - started, 2)})
                print(f"{set_name:8s} {mode:11s} {label:28s} acc {acc.accuracy:6.2f}  merged {acc.accuracy_merged:6.2f}",
                      flush=True)
    return {"benchmark": "routing-accuracy", "results": results}


class _Rows:
    """A view of some rows of a QueryBatch (its embedding cache is shared)."""

    def __init__(self, batch: Any, rows: list[int]) -> None:
        self.batch, self.rows = batch, rows
        self.prompts = [batch.prompts[i] for i in rows]
        self.task_ids = None

    def __len__(self) -> int:
        return len(self.rows)

    def embed(self, space: str, *, adapter: str | None = None, rows: Any = None) -> Any:
        sel = self.rows if rows is None else [self.rows[i] for i in rows]
        return self.batch.embed(space, adapter=adapter, rows=sel)


def _session_routes(args: argparse.Namespace, name: str, cfg: Any, rows: list[Any]) -> tuple[list[Any], float]:
    from cladapt.registry.store import Store
    from cladapt.route_eval import route_accuracy
    from cladapt.serve.routers.session import RoutingSession

    session = RoutingSession(Store.open(args.registry), name, config=cfg, base_model=args.registry_base_model)
    fitted = time.perf_counter()
    return route_accuracy(session, rows).routes, fitted


# ------------------------------------------------------------------ latency and scale


def latency(args: argparse.Namespace) -> dict[str, Any]:
    import statistics

    import torch

    from cladapt.registry.store import Store
    from cladapt.route_eval import benchmark_rows
    from cladapt.serve.routers.session import RoutingSession
    from cladapt.serve.routers.state import router_config

    store = Store.open(args.registry)
    out: list[dict[str, Any]] = []
    for spec in args.routers.split(","):
        label, name, settings = parse_router(spec)
        session = RoutingSession(store, name, config=router_config(name, settings), base_model=args.registry_base_model,
                                 device="cuda" if torch.cuda.is_available() else None)
        tasks = sorted({v.task for v in session.router.tasks.values()})
        queries = benchmark_rows(args.data_dir, tasks, limit=max(1, args.requests // len(tasks)))[: args.requests]
        session.generate([queries[0].text], session.route([queries[0].text]), max_new_tokens=2)  # warm-up
        route_s, gen_s = [], []
        for q in queries:
            t0 = time.perf_counter()
            routes = session.route([q.text])
            t1 = time.perf_counter()
            session.generate([q.text], routes, max_new_tokens=32)
            t2 = time.perf_counter()
            route_s.append(t1 - t0)
            gen_s.append(t2 - t1)
        r, g = statistics.median(route_s), statistics.median(gen_s)
        out.append({"router": label, "requests": len(queries), "route_ms_median": round(1000 * r, 2),
                    "generate32_ms_median": round(1000 * g, 2), "overhead_pct": round(100 * r / g, 2)})
        print(out[-1], flush=True)
    return {"benchmark": "routing-latency", "results": out}


def cl(args: argparse.Namespace) -> dict[str, Any]:
    """``lora+<router>`` cells of ``bench cl``: the lora cell's versions served through a router.

    After task k the candidates are the versions of tasks 0..k; every seen task and the next one are
    scored as ``bench cl`` scores them (same sampled test rows, mode and budget), so AA, BWT and FWT
    under routing sit beside ``lora`` (oracle) in the same results file.
    """
    from cladapt.base_model import load
    from cladapt.bench.cl_spec import read_order
    from cladapt.evaluation import metrics as M
    from cladapt.evaluation.scoring import load_eval_set
    from cladapt.registry.store import Store
    from cladapt.route_eval import evaluate_routed
    from cladapt.serve.routers.accuracy import routing_accuracy
    from cladapt.serve.routers.session import RoutingSession
    from cladapt.serve.routers.state import router_config

    results = json.loads(args.results.read_text())
    lora = results["cells"]["lora"]
    tasks, b, profile = lora["tasks"], lora["b"], results["profile"]
    _, labels = read_order(Path(results["data_dir"]), results["order"])
    sets = {t: load_eval_set(Path(results["data_dir"]) / t / "test.jsonl", task=t, labels=labels[t] or None,
                             limit=profile["test_rows"]) for t in tasks}
    store = Store.open(args.work / "registries" / "lora")
    loaded = load(lora["config"]["base_model"])
    for spec in args.routers.split(","):
        label, name, settings = parse_router(spec)
        cfg = router_config(name, settings)
        R: list[list[float | None]] = [[None] * len(tasks) for _ in tasks]
        acc_rows, started = [], time.time()
        for k in range(len(tasks)):
            session = RoutingSession(store, name, config=cfg, tasks=tasks[: k + 1], loaded=loaded)
            gold: list[str] = []
            routed: list[str | None] = []
            for i in range(min(k + 2, len(tasks))):
                es = sets[tasks[i]]
                routes = session.route([ex.prompt_text for ex in es.examples])
                res = evaluate_routed(session, es, routes, mode=profile["mode"], max_new_tokens=profile["max_new_tokens"],
                                      batch_size=args.batch_size, precision=args.precision)
                R[k][i] = res.score
                if i <= k:
                    gold += [tasks[i]] * len(routes)
                    routed += [r.task for r in routes]
            acc_rows.append(routing_accuracy(gold, routed).to_json())
            loaded = (session.close(), loaded[1], loaded[2])
            print(f"lora+{label} after {tasks[k]}: {[None if v is None else round(v, 1) for v in R[k]]} "
                  f"routing {acc_rows[-1]['accuracy']:.1f}%", flush=True)
        results["cells"][f"lora+{label}"] = {
            "status": "done", "method": f"lora+{label}", "tasks": tasks, "refs": lora["refs"], "R": R, "b": b,
            "metrics": M.summary(R, b), "routing": acc_rows, "router_config": cfg.model_dump(mode="json"),
            "eval_seconds": round(time.time() - started, 1), "train_seconds": lora.get("train_seconds"),
            "machine": machine(), "command": " ".join(sys.argv)}
        args.results.write_text(json.dumps(results, indent=1))
        print(f"lora+{label}: {results['cells'][f'lora+{label}']['metrics']} (oracle lora: {lora['metrics']})", flush=True)
    return {"benchmark": "routing-cl", "results_file": str(args.results),
            "cells": {k: v["metrics"] for k, v in results["cells"].items() if k.startswith("lora")}}


def scale(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cladapt.serve.routers import QueryBatch
    from cladapt.serve.routers.dtkr import DTKRConfig, DTKRRouter

    class Fixed:
        def __init__(self, vecs: torch.Tensor) -> None:
            self.vecs = vecs

        def spaces(self) -> frozenset[str]:
            return frozenset({"encoder"})

        def embed(self, space: str, texts: list[str], *, adapter: str | None = None) -> torch.Tensor:
            return self.vecs[[int(t) for t in texts]]

    gen = torch.Generator().manual_seed(0)
    router = DTKRRouter(DTKRConfig())
    keys = torch.nn.functional.normalize(torch.randn(args.tasks, 6, 4, 64, generator=gen), dim=-1)
    for t in range(args.tasks):
        router.tasks[f"t{t}@1"] = None  # type: ignore[assignment]
        router.keys[f"t{t}@1"] = keys[t]
    queries = torch.nn.functional.normalize(torch.randn(args.requests, 384, generator=gen), dim=-1)
    feats = Fixed(queries)
    router.route(QueryBatch(["0"], feats))  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.requests):
        router.route(QueryBatch([str(i)], feats))
    per, cpu = (time.perf_counter() - t0) / args.requests, (time.process_time() - c0) / args.requests
    # CPU time beside wall time: on a shared machine the wall clock also counts other processes' turns
    res = {"tasks": args.tasks, "keys": args.tasks * 4, "requests": args.requests, "route_ms_per_request": round(1000 * per, 3),
           "route_cpu_ms_per_request": round(1000 * cpu, 3), "torch_threads": torch.get_num_threads()}
    print(res, flush=True)
    return {"benchmark": "routing-scale", "results": [res]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["accuracy", "latency", "scale", "cl"])
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--registry", type=Path, default=None, help="versions trained on the tasks (mos, arrow, latency)")
    ap.add_argument("--registry-base-model", default=None, help="override the base model recorded in the registry")
    ap.add_argument("--base-model", default="smollm2-135m-instruct", help="base space of signature-only candidates")
    ap.add_argument("--routers", default="dtkr", help="comma-separated router[:key=value...] specs")
    ap.add_argument("--sets", default="standard,long", help="standard (5 tasks) and/or long (the pack's long sequence)")
    ap.add_argument("--modes", default="instruction,input", help="instruction (as the benchmark) and/or input (alone)")
    ap.add_argument("--train-rows", type=int, default=256, help="signature rows per task (signature-only candidates)")
    ap.add_argument("--test-rows", type=int, default=200, help="test rows per task")
    ap.add_argument("--requests", type=int, default=50, help="latency/scale: requests timed")
    ap.add_argument("--tasks", type=int, default=1000, help="scale: synthetic tasks")
    ap.add_argument("--results", type=Path, default=None, help="cl: a bench cl results JSON with a finished lora cell")
    ap.add_argument("--work", type=Path, default=None, help="cl: that run's work folder (bench/work/cl_<order>_<profile>)")
    ap.add_argument("--precision", default="auto", help="cl: autocast of the scoring passes (as bench cl profiles)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--embedding-cache", type=Path, default=ROOT / "bench" / "work" / "routing-embeddings",
                    help="accuracy: embeddings kept on disk between runs (signature-only candidates)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.what == "latency" and args.registry is None:
        ap.error("latency needs --registry (versions trained on the benchmark's tasks)")
    if args.what == "cl" and (args.results is None or args.work is None):
        ap.error("cl needs --results (bench cl JSON with a lora cell) and --work (its work folder)")
    started = time.time()
    result = {"accuracy": accuracy, "latency": latency, "scale": scale, "cl": cl}[args.what](args)
    result.update(command=" ".join(sys.argv), machine=machine(), seconds=round(time.time() - started, 1),
                  args={k: str(v) for k, v in vars(args).items()})
    out = args.out or ROOT / "bench" / "results" / f"routing_{args.what}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
