"""`cladapt report`: named after the registry and its task sequence, a version table, loss curves,
"no forgetting measured" instead of an empty chart, legends beside the axes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_run, set_args, task_rows, write_jsonl

from cladapt.evaluation import report as R


def _run(R_rows: list[list[float]]) -> dict:
    return {"tasks": ["dbpedia", "amazon"], "refs": ["dbpedia@1", "amazon@1"], "R": R_rows, "b": [10.0, 12.0],
            "metrics": {}, "curves": []}


def test_nothing_forgotten_is_said_not_drawn(tmp_path: Path) -> None:
    page = R.write_report({"title": "t", "runs": {"seq": _run([[80.0, 5.0], [80.0, 70.0]])}}, tmp_path / "kept")
    text = page.read_text()
    assert "No forgetting measured</b>: every earlier task kept its score" in text
    assert not list((tmp_path / "kept").glob("forgetting_*.png"))
    page = R.write_report({"title": "t", "runs": {"seq": _run([[80.0, 5.0], [62.5, 70.0]])}}, tmp_path / "lost")
    assert "Forgetting split" in page.read_text() and (tmp_path / "lost" / "forgetting_seq.png").is_file()
    one = {"tasks": ["dbpedia"], "refs": ["dbpedia@1"], "R": [[80.0]], "b": [10.0], "metrics": {}}
    assert "one task so far" in R.write_report({"runs": {"one": one}}, tmp_path / "one").read_text()


def test_legends_sit_beside_the_axes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plt = R._plt()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    run = _run([[80.0, 5.0], [62.5, 70.0]])
    R.curves(run, tmp_path / "c.png", "curves")
    R.forgetting_plot({**run, "format_rate": [[90.0, 0.0], [70.0, 80.0]]}, tmp_path / "f.png", "forgetting")
    R.loss_curves([{"ref": "a@1", "loss_curve": [[1, 3.0], [2, 2.5]]}, {"ref": "b@1", "loss_curve": [[1, 2.0]]}],
                  tmp_path / "l.png", "loss")
    assert len(figures) == 3
    for fig in figures:
        fig.canvas.draw()
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.x0 >= axes.x1, "the legend overlaps the plotting area"
        assert legend.x1 <= fig.bbox.x1 + 1, "the legend is cut off"


def test_registry_report_title_versions_and_loss(tmp_path: Path, tiny_base_path: Path, two_tasks) -> None:
    reg = tmp_path / "my-sequence"
    cli_run("registry", "init", reg)
    tests = {k: write_jsonl(tmp_path / f"{k}-test.jsonl", task_rows(k, 4)) for k in ("sentiment", "topics")}
    for task, extra in (("sentiment", []), ("topics", ["--eval-on-history"])):
        cli_run("train", "--registry", reg, "--task", task, "--data", two_tasks[task], "--eval-data", tests[task],
                "--base-model", tiny_base_path, *extra, *set_args(**{"eval.max_new_tokens": 3}))
    cli_run("report", "--registry", reg, "--out", tmp_path / "rep")
    text = (tmp_path / "rep" / "index.html").read_text()
    assert "<h1>my-sequence: sentiment → topics</h1>" in text and str(tmp_path) not in text.split("</h1>")[0]
    table = text.split("<h2>Versions</h2>")[1]
    for cell in ("sentiment@1", "topics@1", "lora", "<td>4</td>", "active", str(tiny_base_path), "<td>16</td>"):
        assert cell in table, cell
    assert (tmp_path / "rep" / "loss.png").stat().st_size > 1000
    shown = json.loads(cli_run("show", "--registry", reg, "topics@1", "--json").stdout)
    assert len(shown["train_stats"]["loss_curve"]) == shown["train_stats"]["steps"]  # logging_steps=1
    assert "forgetting_" in text or "No forgetting measured" in text
