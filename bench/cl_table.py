"""Markdown table of ``cladapt bench cl`` results, as published in the README.

    python bench/cl_table.py bench/results/cl_order1_small.json bench/results/cl_order2_small.json ...

One row per (order, method), with its LoRA shape (targets and rank: equal budgets unless the cell
is a ``+preset`` variant): AA, LA, BWT, FWT, FM (methods.md §11.2, strict exact match), AA of the
constrained (log-likelihood) score, the final format rate, general perplexity after the last task
against the base model's, and the cell's wall time (every version's whole run: data, training,
evaluation). A final block averages each method over the orders it ran on.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from cladapt.bench.cl_spec import lora_label

COLUMNS = ["order", "method", "LoRA", "AA", "LA", "BWT", "FWT", "FM", "AA constrained", "format %", "ppl (base)", "wall min"]


def _f(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def cell_values(cell: dict[str, Any]) -> dict[str, float | None]:
    met, con = cell.get("metrics") or {}, cell.get("metrics_constrained") or {}
    fmt = cell.get("format_rate") or []
    last = [v for v in (fmt[-1] if fmt else []) if v is not None]
    wall = cell.get("wall_seconds")
    return {
        "AA": met.get("AA"), "LA": met.get("LA"), "BWT": met.get("BWT"), "FWT": met.get("FWT"), "FM": met.get("FM"),
        "AA constrained": con.get("AA"), "format %": sum(last) / len(last) if last else None,
        "ppl": (cell.get("ppl") or [None])[-1], "ppl_base": cell.get("ppl_base"),
        "wall min": None if wall is None else wall / 60,
    }


def row(order: str, method: str, v: dict[str, float | None], shape: str) -> str:
    ppl = "–" if v["ppl"] is None else f"{v['ppl']:.2f} ({_f(v['ppl_base'], 2)})"
    cells = [order, f"`{method}`", shape, *[_f(v[k]) for k in ("AA", "LA", "BWT", "FWT", "FM", "AA constrained", "format %")],
             ppl, _f(v["wall min"])]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args()
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    per_method: dict[str, list[dict[str, float | None]]] = defaultdict(list)
    shapes: dict[str, str] = {}
    for path in args.results:
        res = json.loads(path.read_text())
        for method, cell in res.get("cells", {}).items():
            if cell.get("status") != "done":
                continue
            v = cell_values(cell)
            per_method[method].append(v)
            shapes[method] = lora_label((cell.get("config") or {}).get("lora") or {})
            lines.append(row(res["order"], method, v, shapes[method]))
    if len(args.results) > 1:
        for method, vs in per_method.items():
            if len(vs) < 2:
                continue
            mean = {k: (sum(x[k] for x in vs if x[k] is not None) / n if (n := sum(x[k] is not None for x in vs)) else None)
                    for k in vs[0]}
            lines.append(row(f"mean of {len(vs)}", method, mean, shapes[method]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
