"""Serving benchmark: throughput and latency of ``cladapt serve`` over HTTP on 127.0.0.1.

Bounded: every cell sends a fixed number of requests and the run stops by itself.

Measured in one run, on one base model, every cell repeated ``--repeats`` times with the cells of
one repetition interleaved (plain loop, then per concurrency: single / mix, continuous / window),
so a drift of the machine hits every kind of cell alike; the summary gives the median and the
range over repetitions, and every ratio is taken within a repetition:
  * output tokens/s and p50/p99 latency at each concurrency, with every request on ONE adapter and
    with 8 distinct adapters in the mix (target: mix >= 0.9x single);
  * continuous batching (the default) against window-only batching (requests wait for the running
    batch to finish) at ``--window-levels``;
  * the obvious alternative a user would write: a plain transformers + PEFT loop answering one
    request at a time with ``generate`` (target: the server at concurrency 8 >= 3x it);
  * routing overhead per request (dtkr on the base model's embeddings), a cold adapter load from
    the registry (sha256 verified), and the time from a promote to the first answer of the new version.

    python bench/serving.py --smoke                       # tiny random model, ~1 minute (CI-sized)
    python bench/serving.py                               # the default 135M model; results/serving.json
    python bench/serving.py --concurrency 1,4,8,16 --requests-per-slot 3 --max-tokens 32 --repeats 3
    python bench/serving.py --threads 1                   # on a shared, busy CPU (OpenMP spinning hurts there)

Adapters are random LoRAs (r=8 on q_proj/v_proj, like a default train) committed to a scratch registry:
speed does not depend on what the weights learned, and no training is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the sentiment of this review? The film was a delight from start to finish.",
    "Which topic is this paragraph about: the company reported record quarterly earnings.",
    "Answer yes or no: is the following sentence true? Plants need light to grow.",
    "Summarise in one sentence: the village built a new bridge over the river last spring.",
    "What is the topic: the team won the championship after a dramatic final match.",
    "Explain briefly why the sky looks blue during the day.",
    "Classify the sentiment: the plot was boring and the acting was terrible.",
    "Give the title of a song about the sea.",
]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def add_version(store: Any, loaded: tuple[Any, Any, Any], task: str, *, seed: int, r: int,
                prompts: list[str] | None = None) -> Any:
    """Commit one active version of ``task`` with a random LoRA (r, alpha 2r, q_proj/v_proj), the way
    training commits it: PEFT files, manifest, and a routing signature of ``prompts`` when given.

    ``lora_B`` is random too (not zero), so every adapter changes the model's output as a trained one does.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from cladapt.features import SIGNATURE_STEM, build_signature

    model, tok, info = loaded
    with store.stage(task) as staging:
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                         base_model_name_or_path=str(info.path))
        peft_model = get_peft_model(model, cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.6)
        peft_model.save_pretrained(staging.adapter_dir, safe_serialization=True)
        peft_model.unload()  # the base model as it was, for the next adapter
        if prompts:
            sig = build_signature(model, tok, prompts, ["x"] * len(prompts), adapter=None, encoder=None,
                                  base_fingerprint=info.fingerprint)
            staging.write_tensors(f"{SIGNATURE_STEM}.safetensors", sig.tensors())
            staging.write_json(f"{SIGNATURE_STEM}.json", sig.to_json())
        staging.manifest_fields = {
            "method": "lora", "method_config": {}, "composition": "route", "base_model": info.as_dict(),
            "lora": {"r": r, "alpha": 2.0 * r, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "data": {"files": [f"{task}.jsonl"], "sha256": "ab" * 32, "rows": len(prompts or ())},
            "config": {"seed": seed}, "seed": seed, "parents": [], "train_stats": {"steps": 0}, "metrics": {},
        }
        return store.commit(staging, status="active")


def build_registry(root: Path, loaded: tuple[Any, Any, Any], n: int) -> list[str]:
    """``n`` route-composed tasks with random LoRAs and routing signatures; returns their names."""
    from cladapt.registry.store import Store

    store = Store.init(root)
    tasks = [f"task{i}" for i in range(n)]
    for i, task in enumerate(tasks):
        prompts = [PROMPTS[(i + k) % len(PROMPTS)] + f" ({task} {k})" for k in range(6)]
        add_version(store, loaded, task, seed=100 + i, prompts=prompts, r=8)
    return tasks


async def _load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    tokens = 0
    failed = 0
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(body: dict[str, Any]) -> None:
            nonlocal tokens, failed
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url + "/v1/completions", json=body)
                except httpx.TransportError as exc:  # counted, so a dropped connection shows in the result
                    print(f"request failed: {exc!r}", file=sys.stderr)
                    failed += 1
                    return
                if r.status_code != 200:
                    failed += 1
                    return
                lat.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    return {"requests": len(bodies), "failed": failed, "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "p50_s": round(_pct(lat, 0.5), 3), "p99_s": round(_pct(lat, 0.99), 3)}


def plain_loop(loaded: tuple[Any, Any, Any], store_root: Path, tasks: list[str], n: int, max_tokens: int) -> dict[str, Any]:
    """One request at a time through ``PeftModel`` + ``generate`` (what a user writes without a server)."""
    import torch

    from cladapt.adapters.loading import attach
    from cladapt.registry.store import Store
    from cladapt.text.template import render

    model, tok, info = loaded
    peft_model, names = attach(model, Store.open(store_root), info, [f"{t}@1" for t in tasks[:2]])
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            peft_model.set_adapter(names[i % len(names)])
            enc = tok(render(tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]), return_tensors="pt",
                      add_special_tokens=False).to(peft_model.device)
            out = peft_model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            tokens += int(out.shape[1] - enc["input_ids"].shape[1])
    wall = time.perf_counter() - t0
    peft_model.unload()
    return {"requests": n, "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, small sizes")
    ap.add_argument("--base-model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--requests-per-slot", type=int, default=3, help="requests per cell = this x concurrency (min 8)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every cell")
    ap.add_argument("--window-levels", default="4,8", help="concurrencies also measured with continuous batching off")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for every measurement (same for all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    ap.add_argument("--table", type=Path, default=None, help="print the README table of a results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.smoke:
        levels, args.max_tokens, args.repeats = [c for c in levels if c <= 8], min(args.max_tokens, 8), min(args.repeats, 2)
    with tempfile.TemporaryDirectory(prefix="cladapt-bench-serving-") as tmp:
        result = run(Path(tmp), args, levels)
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["machine"] = machine()
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    failed = sum(c.get("failed", 0) for c in result["cells"])
    return 1 if failed else 0


def table(result: dict[str, Any]) -> str:
    """The README's markdown table of one results file (medians over repetitions, [min-max] of ratios)."""
    by = {(c["mode"], c["mix"], c["concurrency"]): c for c in result["summary"]}
    ratios = result["ratios"]
    lines = ["| concurrency | 1 adapter tok/s | p50 / p99 s | 8-adapter mix tok/s | p50 / p99 s | mix / single [range] |",
             "|---|---|---|---|---|---|"]
    for c in sorted({c for m, _, c in by if m == "continuous"}):
        one, mix = by[("continuous", "single", c)], by[("continuous", "mix", c)]
        r = ratios[f"mix_over_single_c{c}"]
        lines.append(f"| {c} | {one['tokens_per_s']:.1f} | {one['p50_s']:.2f} / {one['p99_s']:.2f} | "
                     f"{mix['tokens_per_s']:.1f} | {mix['p50_s']:.2f} / {mix['p99_s']:.2f} | "
                     f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}] |")
    window = sorted({c for m, _, c in by if m == "window"})
    if window:
        lines += ["", "| concurrency | adapters | continuous tok/s | window-only tok/s | continuous / window [range] |",
                  "|---|---|---|---|---|"]
        for c in window:
            for mix in ("single", "mix"):
                r = ratios[f"continuous_over_window_{mix}_c{c}"]
                lines.append(f"| {c} | {'1' if mix == 'single' else '8'} | {by[('continuous', mix, c)]['tokens_per_s']:.1f} | "
                             f"{by[('window', mix, c)]['tokens_per_s']:.1f} | {r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}] |")
    loop = result["plain_peft_loop"]
    c8 = ratios.get("c8_over_plain_loop", {})
    lines.append(f"\nPlain transformers + PEFT loop, one request at a time: {loop['tokens_per_s']:.1f} tok/s "
                 f"(server at concurrency 8, one adapter: {c8.get('median', float('nan')):.2f}x "
                 f"[{c8.get('min', float('nan')):.2f}-{c8.get('max', float('nan')):.2f}]). "
                 f"Routing (dtkr, base space) {result['routing_ms_per_request']} ms a request; cold adapter load "
                 f"{result['cold_load_ms']} ms; promote -> first answer of the new version "
                 f"{result['promote_to_new_version_ms']} ms. Medians of {result['repeats']} interleaved repetitions.")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the load average says how shared the CPU was)."""
    import os
    import platform

    import peft
    import torch
    import transformers

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "command": " ".join(["python", *sys.argv])}


def run(tmp: Path, args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from cladapt.base_model import load

    if args.smoke:
        from tiny import build_tiny

        base = str(build_tiny(tmp / "tiny"))
    else:
        base = args.base_model
    loaded = load(base)
    tasks = build_registry(tmp / "reg", loaded, args.adapters)
    out: dict[str, Any] = {"base_model": base, "adapters": len(tasks), "max_tokens": args.max_tokens,
                           "repeats": args.repeats}
    window = [int(c) for c in args.window_levels.split(",") if c and int(c) in levels]
    out["cells"] = serve_cells(tmp / "reg", base, tasks, levels, window, args, loaded)
    out.update(overheads(tmp / "reg", base, tasks, loaded))
    out.update(summarise(out["cells"], levels, window))
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "n": len(values)}


def summarise(cells: list[dict[str, Any]], levels: list[int], window: list[int]) -> dict[str, Any]:
    """Medians and ranges over repetitions; every ratio is formed within one repetition first."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    reps: dict[int, dict[tuple[str, str, int], dict[str, Any]]] = {}
    loops: dict[int, float] = {}
    for c in cells:
        if c["mode"] == "plain-loop":
            loops[c["rep"]] = c["tokens_per_s"]
            continue
        key = (c["mode"], c["mix"], c["concurrency"])
        groups.setdefault(key, []).append(c)
        reps.setdefault(c["rep"], {})[key] = c
    summary = []
    for (mode, mix, conc), cs in sorted(groups.items()):
        summary.append({"mode": mode, "mix": mix, "concurrency": conc,
                        "tokens_per_s": statistics.median(x["tokens_per_s"] for x in cs),
                        "tokens_per_s_range": [min(x["tokens_per_s"] for x in cs), max(x["tokens_per_s"] for x in cs)],
                        "p50_s": statistics.median(x["p50_s"] for x in cs), "p99_s": statistics.median(x["p99_s"] for x in cs),
                        "mean_batch_rows": statistics.median(x["mean_batch_rows"] for x in cs),
                        "joined": sum(x["joined"] for x in cs), "failed": sum(x["failed"] for x in cs), "n": len(cs)})

    def ratio(num: tuple[str, str, int], den: tuple[str, str, int]) -> dict[str, float]:
        return _spread([r[num]["tokens_per_s"] / r[den]["tokens_per_s"] for r in reps.values() if num in r and den in r])

    ratios = {f"mix_over_single_c{c}": ratio(("continuous", "mix", c), ("continuous", "single", c)) for c in levels}
    for c in window:
        for mix in ("single", "mix"):
            ratios[f"continuous_over_window_{mix}_c{c}"] = ratio(("continuous", mix, c), ("window", mix, c))
    if 8 in levels:
        ratios["c8_over_plain_loop"] = _spread([reps[r][("continuous", "single", 8)]["tokens_per_s"] / loops[r]
                                                for r in reps if r in loops])
    loop_values = list(loops.values())
    plain = {"tokens_per_s": statistics.median(loop_values), "tokens_per_s_range": [min(loop_values), max(loop_values)]}
    return {"summary": summary, "ratios": ratios, "plain_peft_loop": plain}


def _batch_counters(url: str) -> tuple[float, float, float]:
    """(batches started, rows they started with, requests that joined running batches) from /metrics."""
    import httpx

    values = {"cladapt_batch_size_count": 0.0, "cladapt_batch_size_sum": 0.0, "cladapt_joined_requests_total": 0.0}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values["cladapt_batch_size_count"], values["cladapt_batch_size_sum"], values["cladapt_joined_requests_total"]


def serve_cells(reg: Path, base: str, tasks: list[str], levels: list[int], window: list[int], args: argparse.Namespace,
                loaded: tuple[Any, Any, Any]) -> list[dict[str, Any]]:
    """Every repetition: the plain loop, then per concurrency single/mix x continuous/window, in an order
    that alternates between repetitions."""
    from cladapt.registry.store import Store
    from cladapt.serve.app import create_app
    from cladapt.serve.running import BackgroundServer
    from cladapt.serve.server import Server, load_serve_config

    config = load_serve_config(base_model=base, max_batch_size=max(levels), cache_capacity=len(tasks),
                               max_queue=4 * max(levels) * args.requests_per_slot)
    server = Server(config, Store.open(reg)).start()
    cells: list[dict[str, Any]] = []
    n_loop = 8 if not args.smoke else 4
    try:
        with BackgroundServer(create_app(server)) as bg:
            warm = [{"model": t, "prompt": "hi", "max_tokens": 2, "temperature": 0} for t in tasks]
            asyncio.run(_load(bg.url, warm, len(tasks)))  # adapters loaded once: the cells measure decoding
            for rep in range(args.repeats):
                loop = plain_loop(loaded, reg, tasks, n_loop, args.max_tokens)
                cells.append({"rep": rep, "mode": "plain-loop", "mix": "single", "concurrency": 1, **loop})
                print(f"[{rep}] plain loop: {loop['tokens_per_s']:8.1f} tok/s", file=sys.stderr)
                for c in levels:
                    kinds = [(m, x) for m in ("continuous", "window") if m == "continuous" or c in window
                             for x in ("single", "mix")]
                    for mode, mix in kinds if rep % 2 == 0 else kinds[::-1]:
                        server.batcher.continuous = mode == "continuous"
                        n = max(8, args.requests_per_slot * c)
                        bodies = [{"model": tasks[i % len(tasks)] if mix == "mix" else tasks[0],
                                   "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0}
                                  for i in range(n)]
                        b0, r0, j0 = _batch_counters(bg.url)
                        cell = {"rep": rep, "mode": mode, "mix": mix, "concurrency": c, **asyncio.run(_load(bg.url, bodies, c))}
                        b1, r1, j1 = _batch_counters(bg.url)
                        cell["batches"], cell["joined"] = int(b1 - b0), int(j1 - j0)
                        cell["mean_batch_rows"] = round((r1 - r0) / max(b1 - b0, 1), 2)
                        print(f"[{rep}] {mode:10s} {mix:6s} c={c:2d}: {cell['tokens_per_s']:8.1f} tok/s  "
                              f"p50 {cell['p50_s']:.3f}s  p99 {cell['p99_s']:.3f}s  batches {cell['batches']} "
                              f"joined {cell['joined']}  failed {cell['failed']}", file=sys.stderr)
                        cells.append(cell)
            server.batcher.continuous = True
    finally:
        server.close()
    return cells


def overheads(reg: Path, base: str, tasks: list[str], loaded: tuple[Any, Any, Any]) -> dict[str, Any]:
    """Routing per request, a cold load from the registry, promote -> first answer of the new version."""
    from cladapt.registry.store import Store
    from cladapt.serve.routers import QueryBatch
    from cladapt.serve.server import Server, load_serve_config

    hidden = int(loaded[0].config.hidden_size)
    groups = 6 if hidden % 6 == 0 else 4  # DTKR's default 6 groups fit SmolLM2's 576; the tiny model has 64
    config = load_serve_config(base_model=base, router="dtkr", router_config={"space": "base", "groups": groups},
                               resolve_ttl_s=0)
    server = Server(config, Store.open(reg)).start()
    try:
        route_ms = []
        for p in PROMPTS * 2:
            t0 = time.perf_counter()
            server.router.route(QueryBatch([p], server.features))
            route_ms.append(1000 * (time.perf_counter() - t0))
        load_ms = []
        for t in tasks:
            t0 = time.perf_counter()
            server.cache.ensure([f"{t}@1"])
            load_ms.append(1000 * (time.perf_counter() - t0))
        store = Store.open(reg)
        add_version(store, loaded, tasks[0], seed=999, r=8)  # a new train commits tasks[0]@2 as active
        t0 = time.perf_counter()
        target = server.catalog.resolve(tasks[0])
        server.cache.ensure([target.key])
        reload_ms = 1000 * (time.perf_counter() - t0)
        assert target.label == f"{tasks[0]}@2"
    finally:
        server.close()
    return {"routing_ms_per_request": round(statistics.median(route_ms), 2),
            "cold_load_ms": round(statistics.median(load_ms), 1),
            "promote_to_new_version_ms": round(reload_ms, 1)}


if __name__ == "__main__":
    sys.exit(main())
