"""Serving benchmark: throughput and latency of ``cladapt serve`` over HTTP on 127.0.0.1.

Bounded: every cell sends a fixed number of requests and the run stops by itself.

Measured in one run, on one base model:
  * output tokens/s and p50/p99 latency at each concurrency, with every request on ONE adapter and
    with 8 distinct adapters in the mix (target: mix >= 0.9x single);
  * the obvious alternative a user would write: a plain transformers + PEFT loop answering one
    request at a time with ``generate`` (target: the server at concurrency 8 >= 3x it);
  * routing overhead per request (dtkr on the base model's embeddings), a cold adapter load from
    the registry (sha256 verified), and the time from a promote to the first answer of the new version.

    python bench/serving.py --smoke                       # tiny random model, ~1 minute (CI-sized)
    python bench/serving.py                               # the default 135M model; results/serving.json
    python bench/serving.py --concurrency 1,4,8,16 --requests-per-slot 4 --max-tokens 32
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
    ap.add_argument("--requests-per-slot", type=int, default=4, help="requests per cell = this x concurrency (min 8)")
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
        levels, args.max_tokens = [c for c in levels if c <= 8], min(args.max_tokens, 8)
    with tempfile.TemporaryDirectory(prefix="cladapt-bench-serving-") as tmp:
        result = run(Path(tmp), args, levels)
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["machine"] = machine()
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    failed = sum(c["failed"] for c in result["cells"])
    return 1 if failed else 0


def table(result: dict[str, Any]) -> str:
    """The README's markdown table of one results file."""
    by = {(c["mix"], c["concurrency"]): c for c in result["cells"]}
    lines = ["| concurrency | 1 adapter tok/s | p50 / p99 s | 8-adapter mix tok/s | p50 / p99 s | mix / single |",
             "|---|---|---|---|---|---|"]
    for c in sorted({c for _, c in by}):
        one, mix = by[("single", c)], by[("mix", c)]
        lines.append(f"| {c} | {one['tokens_per_s']:.1f} | {one['p50_s']:.2f} / {one['p99_s']:.2f} | "
                     f"{mix['tokens_per_s']:.1f} | {mix['p50_s']:.2f} / {mix['p99_s']:.2f} | "
                     f"{mix['tokens_per_s'] / one['tokens_per_s']:.2f} |")
    plain = result["plain_peft_loop"]["tokens_per_s"]
    lines.append(f"\nPlain transformers + PEFT loop, one request at a time: {plain:.1f} tok/s "
                 f"(server at concurrency 8: {result['ratios'].get('c8_over_plain_loop', float('nan')):.2f}x). "
                 f"Routing (dtkr, base space) {result['routing_ms_per_request']} ms a request; cold adapter load "
                 f"{result['cold_load_ms']} ms; promote -> first answer of the new version "
                 f"{result['promote_to_new_version_ms']} ms.")
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
    out: dict[str, Any] = {"base_model": base, "adapters": len(tasks), "max_tokens": args.max_tokens, "cells": []}
    out["plain_peft_loop"] = plain_loop(loaded, tmp / "reg", tasks, 8 if not args.smoke else 4, args.max_tokens)
    print(f"plain transformers+PEFT loop: {out['plain_peft_loop']['tokens_per_s']} tok/s", file=sys.stderr)
    out["cells"] = serve_cells(tmp / "reg", base, tasks, levels, args)
    out.update(overheads(tmp / "reg", base, tasks, loaded))
    by = {(c["mix"], c["concurrency"]): c for c in out["cells"]}
    out["ratios"] = {
        f"mix8_over_single_c{c}": round(by[("mix", c)]["tokens_per_s"] / by[("single", c)]["tokens_per_s"], 3)
        for c in levels
    }
    if 8 in levels:
        out["ratios"]["c8_over_plain_loop"] = round(by[("single", 8)]["tokens_per_s"] / out["plain_peft_loop"]["tokens_per_s"], 3)
    return out


def serve_cells(reg: Path, base: str, tasks: list[str], levels: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    from cladapt.registry.store import Store
    from cladapt.serve.app import create_app
    from cladapt.serve.running import BackgroundServer
    from cladapt.serve.server import Server, load_serve_config

    config = load_serve_config(base_model=base, max_batch_size=max(levels), cache_capacity=len(tasks),
                               max_queue=4 * max(levels) * args.requests_per_slot)
    server = Server(config, Store.open(reg)).start()
    cells = []
    try:
        with BackgroundServer(create_app(server)) as bg:
            warm = [{"model": t, "prompt": "hi", "max_tokens": 2, "temperature": 0} for t in tasks]
            asyncio.run(_load(bg.url, warm, len(tasks)))  # adapters loaded once: the cells measure decoding
            for mix in ("single", "mix"):
                for c in levels:
                    n = max(8, args.requests_per_slot * c)
                    bodies = [{"model": tasks[i % len(tasks)] if mix == "mix" else tasks[0],
                               "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0}
                              for i in range(n)]
                    cell = {"mix": mix, "concurrency": c, **asyncio.run(_load(bg.url, bodies, c))}
                    print(f"{mix:6s} c={c:2d}: {cell['tokens_per_s']:8.1f} tok/s  p50 {cell['p50_s']:.3f}s  "
                          f"p99 {cell['p99_s']:.3f}s  failed {cell['failed']}", file=sys.stderr)
                    cells.append(cell)
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
