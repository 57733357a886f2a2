"""A static HTML report with matplotlib figures: accuracy matrices, curves, forgetting split, gate.

Input is plain data, so ``cladapt report`` (one registry) and ``cladapt bench cl`` (several
methods) share it::

    {"title": str, "meta": {key: value},
     "runs": {name: {"tasks": [...], "refs": [...], "R": [[...]], "b": [...], "metrics": {...},
                     "format_rate": [[...]], "constrained": [[...]], "ppl": [...], "ppl_base": float,
                     "curves": [{"step", "task", "kind", "scores"}, ...]}},
     "gate": [{"ref", "status", "admitted", "reasons"}, ...],
     "versions": [{"ref", "method", "r", "status", "base", "rows", "created", "train_loss", "loss_curve"}, ...]}

Per run it draws ``heatmap_<run>.png`` (R with b as the first row), ``curves_<run>.png`` (each
task's score after every training stage, or the continual-evaluation curves with task switches
when present) and ``forgetting_<run>.png`` (per task: the drop in strict accuracy next to the drop
in format rate, superficial forgetting, and in constrained accuracy, essential forgetting;
methods.md §4.3; a sentence instead when nothing was forgotten). With ``versions`` it adds the
version table and ``loss.png``, the training-loss curve of each version. Legends sit right of the
axes, where they hide nothing. ``index.html`` holds every number as a table too.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

METRICS = ("AA", "LA", "BWT", "FWT", "FM", "MAA")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "run"


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINES = ("-", "--", "-.", ":")


def _style(k: int, *, markers: bool = True) -> dict[str, Any]:
    """Line ``k``'s marker and dash: lines with equal scores stay told apart (a later one never hides an earlier)."""
    style: dict[str, Any] = {"linestyle": _LINES[k % len(_LINES)], "alpha": 0.85}
    if markers:
        style.update(marker=_MARKERS[k % len(_MARKERS)], markersize=7 - min(k, 3), markerfacecolor="none")
    return style


def _legend_outside(ax: Any) -> None:
    """The legend right of the axes, where it cannot hide a line or a bar."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def loss_curves(versions: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Training loss against optimizer step, one line per version (``train_stats.loss_curve``)."""
    drawn = [v for v in versions if v.get("loss_curve")]
    if not drawn:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for v in drawn:
        steps, losses = zip(*v["loss_curve"], strict=True)
        ax.plot(steps, losses, **_style(drawn.index(v), markers=len(steps) < 40), label=v["ref"])
    ax.set_xlabel("optimizer step (each version's own run)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def heatmap(run: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    tasks, R, b = run["tasks"], run["R"], run.get("b") or []
    rows = ([b] if b else []) + R
    labels = (["base"] if b else []) + [f"after {t}" for t in tasks]
    grid = [[float("nan") if v is None else v for v in row] for row in rows]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.5 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("evaluated on")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="score %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves(run: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    points = run.get("curves") or []
    tasks = run["tasks"]
    if points:
        # continual evaluation: x = global step; vertical lines mark task switches
        for k, t in enumerate(dict.fromkeys(t for p in points for t in p["scores"])):
            xs = [p["x"] for p in points if t in p["scores"]]
            ax.plot(xs, [p["scores"][t] for p in points if t in p["scores"]], **_style(k, markers=False), label=t)
        for p in points:
            if p.get("kind") == "start":
                ax.axvline(p["x"], color="grey", lw=0.6, ls=":")
        ax.set_xlabel("optimizer step (all tasks)")
    else:
        for i, t in enumerate(tasks):
            ys = [row[i] if i < len(row) else None for row in run["R"]]
            xs = [k for k, y in enumerate(ys) if y is not None]
            ax.plot(xs, [ys[k] for k in xs], **_style(i), label=t)
        ax.set_xticks(range(len(tasks)), [f"after {t}" for t in tasks], rotation=20, ha="right")
    ax.set_ylim(-2, 102)
    ax.set_ylabel("score %")
    ax.set_title(title)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def forgetting_split(run: dict[str, Any]) -> dict[str, list[float | None]]:
    """Per task (all but the last): drop from right-after-learning to the end, per view."""
    out: dict[str, list[float | None]] = {}
    T = len(run["tasks"])
    for name, key in (("strict", "R"), ("format rate", "format_rate"), ("constrained", "constrained")):
        grid = run.get(key) or []
        if len(grid) != T:
            continue
        drops = [None if grid[i][i] is None or grid[-1][i] is None else grid[i][i] - grid[-1][i] for i in range(T - 1)]
        if any(d is not None for d in drops):
            out[name] = drops
    return out


#: drops smaller than this (points) count as nothing forgotten: a chart of zero-height bars says nothing
NO_FORGETTING = 0.05


def forgetting_measured(split: dict[str, list[float | None]]) -> bool:
    """True when some task lost (or gained) measurably since it was learned."""
    return any(d is not None and abs(d) >= NO_FORGETTING for drops in split.values() for d in drops)


def forgetting_plot(run: dict[str, Any], path: Path, title: str) -> bool:
    """Draw the forgetting split; False (nothing drawn) when there is nothing to show."""
    split = forgetting_split(run)
    if not forgetting_measured(split):
        return False
    plt = _plt()
    tasks = run["tasks"][:-1]
    fig, ax = plt.subplots(figsize=(3.0 + 1.1 * len(tasks), 3.4))
    width = 0.8 / len(split)
    for k, (name, drops) in enumerate(split.items()):
        ax.bar([i + k * width for i in range(len(tasks))], [d or 0.0 for d in drops], width, label=name)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks([i + width * (len(split) - 1) / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("drop (points)")
    ax.set_title(title)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def comparison(runs: dict[str, dict[str, Any]], path: Path) -> bool:
    """Grouped bars of AA, BWT, FWT and FM per run (several methods on one order)."""
    keys = ("AA", "BWT", "FWT", "FM")
    names = [n for n, r in runs.items() if r.get("metrics")]
    if not names:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.0 + 1.6 * len(keys), 3.4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        vals = [runs[name]["metrics"].get(m) or 0.0 for m in keys]
        ax.bar([i + k * width for i in range(len(keys))], vals, width, label=name)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(keys))], keys)
    ax.set_ylabel("points")
    ax.set_title("methods compared")
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _matrix_html(run: dict[str, Any]) -> str:
    tasks = run["tasks"]
    rows = [["<b>base (b)</b>", *[_fmt(v) for v in run.get("b") or [None] * len(tasks)], _fmt(run.get("ppl_base"), 3)]]
    refs = run.get("refs") or tasks
    ppl = run.get("ppl") or [None] * len(tasks)
    for k, row in enumerate(run["R"]):
        cells = [f"<b>{v}</b>" if i == k else v for i, v in enumerate(_fmt(x) for x in row)]  # R[k][k] in bold
        rows.append([f"after {html.escape(str(refs[k]))}", *cells, _fmt(ppl[k] if k < len(ppl) else None, 3)])
    return _table(["", *[html.escape(t) for t in tasks], "general ppl"], rows)


STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child{text-align:left}img{max-width:100%;margin:4px 8px 4px 0;border:1px solid #eee}
.figs{display:flex;flex-wrap:wrap;align-items:flex-start}.rej{color:#b00}.ok{color:#070}.meta{color:#555;font-size:90%}h2{border-bottom:1px solid #ddd}"""


def _forgetting_html(run: dict[str, Any], out: Path, name: str, slug: str, imgs: list[str]) -> str:
    """The forgetting split as a table and a chart, or a sentence saying none was measured."""
    split = forgetting_split(run)
    if not forgetting_plot(run, out / f"forgetting_{slug}.png", f"{name}: forgetting split"):
        why = "one task so far" if len(run["tasks"]) < 2 else (
            "no earlier task was re-scored (train with --eval-on-history)" if not split
            else "every earlier task kept its score")
        return f"<p><b>No forgetting measured</b>: {why}.</p>"
    imgs.append(f"forgetting_{slug}.png")
    return ("<p>Forgetting split (points lost from right-after-learning to the end; format rate = "
            "superficial, constrained = essential):</p>"
            + _table(["view", *map(html.escape, run["tasks"][:-1])], [[k, *[_fmt(v) for v in vals]] for k, vals in split.items()]))


def _versions_html(versions: list[dict[str, Any]], out: Path) -> str:
    """Every version (method, rank, status, base, data rows, created) and their training-loss curves."""
    if not versions:
        return ""
    rows = [[html.escape(v["ref"]), html.escape(v["method"]), _fmt(v["r"]), html.escape(v["status"]),
             html.escape(str(v["base"])), _fmt(v["rows"]), html.escape(v["created"][:19].replace("T", " ")),
             _fmt(v.get("train_loss"), 4)] for v in versions]
    part = "<h2>Versions</h2>" + _table(["version", "method", "rank", "status", "base model", "data rows", "created",
                                         "final loss"], rows)
    if loss_curves(versions, out / "loss.png", "training loss"):
        part += "<div class='figs'><img src='loss.png' alt='loss.png'></div>"
    return part


def write_report(data: dict[str, Any], out: Path) -> Path:
    """Write ``index.html`` and its PNGs into ``out``; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = data.get("runs", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.get('title', 'cladapt'))}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(data.get('title', 'cladapt report'))}</h1>"]
    meta = data.get("meta") or {}
    if meta:
        parts.append("<p class='meta'>" + "<br>".join(f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}"
                                                      for k, v in meta.items()) + "</p>")
    summary_rows = [[html.escape(name), *[_fmt((r.get("metrics") or {}).get(m), 2) for m in METRICS],
                     _fmt((r.get("metrics_constrained") or {}).get("AA"), 2),
                     _fmt((r.get("ppl") or [None])[-1] if r.get("ppl") else None, 3)] for name, r in runs.items()]
    parts.append("<h2>Summary</h2>" + _table(["run", *METRICS, "AA constrained", "final ppl"], summary_rows))
    if len(runs) > 1 and comparison(runs, out / "summary.png"):
        parts.append("<div class='figs'><img src='summary.png' alt='summary.png'></div>")
    parts.append("<p class='meta'>Scores in %. AA: mean over tasks after the last one; LA: right after learning each; "
                 "BWT &lt; 0 is forgetting; FWT: gain over the base model before training a task; FM: mean max drop; "
                 "MAA: mean of the running averages (methods.md §11.2).</p>")
    for name, run in runs.items():
        slug = _slug(name)
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if not run.get("tasks"):
            parts.append("<p>no evaluated versions</p>")
            continue
        parts.append(_matrix_html(run))
        heatmap(run, out / f"heatmap_{slug}.png", f"{name}: R[t][i]")
        curves(run, out / f"curves_{slug}.png", f"{name}: scores over training")
        imgs = [f"heatmap_{slug}.png", f"curves_{slug}.png"]
        parts.append(_forgetting_html(run, out, name, slug, imgs))
        parts.append("<div class='figs'>" + "".join(f"<img src='{i}' alt='{i}'>" for i in imgs) + "</div>")
    parts.append(_versions_html(data.get("versions") or [], out))
    gate = data.get("gate") or []
    if gate:
        rows = [[html.escape(g["ref"]), html.escape(g.get("status", "")),
                 "<span class='ok'>admitted</span>" if g.get("admitted") else "<span class='rej'>rejected</span>",
                 html.escape("; ".join(g.get("reasons") or [])) or "–"] for g in gate]
        parts.append("<h2>Admission gate</h2>" + _table(["version", "status now", "decision", "reasons"], rows))
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def registry_report_data(store: Any) -> dict[str, Any]:
    """Report data of one registry: its square view, continual curves and gate decisions."""
    from cladapt.errors import NotFound
    from cladapt.evaluation.accuracy_matrix import recorded_rows, square

    rows = recorded_rows(store)
    view = square(rows)
    run = view.to_json()
    points: list[dict[str, Any]] = []
    offset = 0
    for ref in view.refs:
        try:
            curve = store.read_json(ref, "continual_eval")
        except NotFound:  # trained without --eval-every: no curves
            continue
        for p in curve.get("points", []):
            points.append({**p, "x": offset + p["step"]})
        offset = points[-1]["x"] if points else offset
    run["curves"] = points
    gate = [{"ref": r.ref, "status": r.status, "admitted": r.gate.get("admitted"), "reasons": r.gate.get("reasons")}
            for r in rows if r.gate]
    name = registry_name(store.root)
    versions = [version_row(r) for r in sorted(store.list(), key=lambda r: r.created)]
    title = f"{name}: {' → '.join(view.tasks)}" if view.tasks else name
    return {"title": title, "meta": {"registry": name, "versions": len(versions), "versions evaluated": len(rows)},
            "runs": {name: run}, "gate": gate, "versions": versions}


def registry_name(root: Path) -> str:
    """What a registry is called in a report: its folder's name (the parent's too for generic names)."""
    root = Path(root).resolve()
    if root.name in (".cladapt", "registry", "reg") and root.parent.name:
        return f"{root.parent.name}/{root.name}"
    return root.name or str(root)


def version_row(rec: Any) -> dict[str, Any]:
    """One line of the version table, with the loss curve its run recorded."""
    stats = rec.manifest.train_stats
    return {"ref": str(rec.ref), "method": rec.method, "r": rec.r, "status": rec.status,
            "base": rec.manifest.base_model.get("id"), "rows": rec.manifest.data.get("rows"), "created": rec.created,
            "train_loss": stats.get("train_loss"), "loss_curve": stats.get("loss_curve") or []}
