"""The HTML report: files exist and hold the numbers."""

from __future__ import annotations

from pathlib import Path

from cladapt.evaluation import metrics as M
from cladapt.evaluation.report import forgetting_split, write_report

R = [[81.5, 12.0], [64.25, 77.0]]


def _run() -> dict:
    return {
        "tasks": ["dbpedia", "amazon"], "refs": ["dbpedia@1", "amazon@1"], "R": R, "b": [3.0, 9.5],
        "format_rate": [[95.0, 40.0], [70.0, 99.0]], "constrained": [[85.0, 30.0], [83.0, 78.0]],
        "metrics": M.summary(R, [3.0, 9.5]), "ppl": [12.3456, 13.5], "ppl_base": 12.0,
        "curves": [
            {"x": 0, "kind": "start", "scores": {"dbpedia": 3.0}},
            {"x": 5, "kind": "step", "scores": {"dbpedia": 60.0}},
            {"x": 5, "kind": "start", "scores": {"dbpedia": 81.5, "amazon": 12.0}},
            {"x": 10, "kind": "step", "scores": {"dbpedia": 50.0, "amazon": 70.0}},
        ],
    }


def test_report_writes_html_and_pngs_with_the_numbers(tmp_path: Path) -> None:
    data = {
        "title": "CL benchmark order1", "meta": {"command": "cladapt bench cl"},
        "runs": {"inc-lora": _run(), "mtl": {**_run(), "curves": [], "constrained": []}},
        "gate": [{"ref": "amazon@2", "status": "rejected", "admitted": False, "reasons": ["amazon: score 3.00 < min_score 50"]}],
    }
    page = write_report(data, tmp_path / "rep")
    text = page.read_text()
    for name in ("heatmap_inc-lora.png", "curves_inc-lora.png", "forgetting_inc-lora.png", "heatmap_mtl.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 1000
        assert f"src='{name}'" in text
    assert "64.2" in text and "77.0" in text and "81.5" in text  # the R cells
    assert "-17.25" in text  # BWT = 64.25 - 81.5
    assert "12.346" in text  # general perplexity
    assert "min_score 50" in text and "rejected" in text
    assert "Forgetting split" in text


def test_forgetting_split_separates_superficial_and_essential() -> None:
    split = forgetting_split(_run())
    assert split == {"strict": [81.5 - 64.25], "format rate": [25.0], "constrained": [2.0]}


def test_empty_run_still_renders(tmp_path: Path) -> None:
    page = write_report({"runs": {"registry": {"tasks": [], "R": []}}}, tmp_path)
    assert "no evaluated versions" in page.read_text()
