"""``cladapt bench cl``: the continual-learning benchmark (cladapt.bench), rendered as a table."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from cladapt.cli.common import budget_type, config_options, console, fixed


@click.group("bench")
def bench_group() -> None:
    """Benchmarks (results go to bench/results/ with machine, versions and command)."""


@bench_group.command("cl")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="CL benchmark folder with manifest.json (e.g. ../shared/data/cl-benchmark)")
@click.option("--order", default="order1", show_default=True, help="a task order named in the manifest")
@click.option("--profile", type=click.Choice(["smoke", "quick", "small", "full"]), default="small", show_default=True,
              help="smoke: 16 rows, 2 steps; quick: 160/60 rows; small: 300/100 rows; full: all rows")
@click.option("--methods", default="lora,seq-lora,inc-lora,olora,mtl", show_default=True,
              help="comma-separated; a method may carry variants: seq-lora+asd, olora+gere-lf, reglora+preset")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"), show_default=True)
@click.option("--base-model", default=None)
@click.option("--mode", type=click.Choice(["generate", "constrained", "both"]), default=None,
              help="override the profile's scoring mode")
@click.option("--max-new-tokens", type=budget_type(), default=None,
              help="override the profile's generation budget: tokens, or auto (longest label + 4)")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/work"), show_default=True,
              help="scratch: sampled data and one registry per method, kept for resuming")
@click.option("--fresh", is_flag=True, help="discard earlier results and registries of this order and profile")
@click.option("--ppl-data", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="general text (JSON Lines with 'text') for the general-perplexity column; added to finished cells too")
@click.option("--ppl-samples", type=click.IntRange(min=1), default=64, show_default=True, help="texts used for general perplexity")
@click.option("--replay-data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="general texts replayed by the +gere-<loss> method variants (e.g. seq-lora+gere-lf)")
@config_options
def bench_cl(data_dir: Path, order: str, profile: str, methods: str, out: Path, base_model: str | None, mode: str | None,
             max_new_tokens: int | str | None, work_dir: Path, fresh: bool, ppl_data: tuple[Path, ...], ppl_samples: int,
             replay_data: Path | None, configs: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Continual-learning benchmark: train every method over an order, score every task after each.

    \b
    cladapt bench cl --data-dir ../shared/data/cl-benchmark --order order1 --profile small --methods lora,olora,mtl \\
        --ppl-data ../shared/data/general-replay/c4.jsonl

    Every cell trains LoRA on q_proj,v_proj at r 8 (equal budgets); +preset keeps the method preset's own
    shape (reglora+preset: all linear layers). Methods take data-pipeline variants: seq-lora+asd,
    olora+gere-lf (with --replay-data), inc-lora+asd+gere-tm. Each cell runs in its own process.
    Resumable: finished (order, method) cells and finished tasks inside a cell are reused.
    """
    import shlex
    import sys
    from dataclasses import replace

    from cladapt.bench.cl import run_bench
    from cladapt.bench.cl_spec import PROFILES, BenchSpec, lora_label

    if configs:
        raise click.UsageError("bench cl takes --set overrides only (the profile is the config)")
    prof = PROFILES[profile]
    if mode:
        prof = replace(prof, mode=mode)
    if max_new_tokens is not None:
        prof = replace(prof, max_new_tokens=None if max_new_tokens == "auto" else int(max_new_tokens))
    spec = BenchSpec(data_dir, order, prof, [m.strip() for m in methods.split(",") if m.strip()], out,
                     base_model=base_model, overrides=list(overrides), fresh=fresh, work=work_dir,
                     ppl_files=list(ppl_data), ppl_samples=ppl_samples, replay_data=replay_data, command=shlex.join(sys.argv))
    path = run_bench(spec)
    results = json.loads(path.read_text())
    table = Table("method", "LoRA", "AA", "LA", "BWT", "FWT", "FM", "AA (constrained)", "ppl (base)", "train s", "eval s",
                  title=f"{order} ({profile}): {' -> '.join(results['tasks'])}")
    for m in spec.methods:
        cell = results["cells"].get(m) or {}
        met, con = cell.get("metrics") or {}, cell.get("metrics_constrained") or {}
        ppl = f"{cell['ppl'][-1]:.2f} ({cell['ppl_base']:.2f})" if cell.get("ppl") else "–"
        shape = lora_label(cell["config"]["lora"]) if cell.get("config") else cell.get("status", "–")
        table.add_row(m, shape, *[fixed(met.get(k), 2) for k in ("AA", "LA", "BWT", "FWT", "FM")], fixed(con.get("AA"), 2), ppl,
                      fixed(cell.get("train_seconds")), fixed(cell.get("eval_seconds")))
    console.print(table)
    console.print(f"results: {path}\nreport: {path.with_suffix('')}/index.html")



commands: list[click.Command] = [bench_group]
