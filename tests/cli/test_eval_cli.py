"""Evaluation and governance through the CLI on the tiny model: eval, history, gate, promote,
rollback, log, report, bench cl."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import cli_run, set_args, task_rows, write_jsonl

run = cli_run


def sets(**extra: object) -> list[str]:
    return set_args(**{"eval.max_new_tokens": 3, **extra})


@pytest.fixture
def evalsets(tmp_path: Path) -> dict[str, Path]:
    return {k: write_jsonl(tmp_path / f"{k}-test.jsonl", task_rows(k, 8)) for k in ("sentiment", "topics")}


def test_history_gate_promote_rollback_log_report(tmp_path, tiny_base_path, two_tasks, evalsets) -> None:
    reg = tmp_path / "reg"
    common = ["--registry", reg, "--base-model", tiny_base_path]
    run("registry", "init", reg)
    run("train", "--task", "sentiment", "--data", two_tasks["sentiment"], "--eval-data", evalsets["sentiment"], *common, *sets())
    hist = json.loads(run("history", "--registry", reg, "--json").output)
    assert hist["tasks"] == ["sentiment"] and hist["refs"] == ["sentiment@1"] and hist["b"][0] is not None
    assert "accuracy matrix" in run("history", "--registry", reg).output

    run("gate", "set", "--registry", reg, "--min-score", "100", "--max-drop", "0")
    assert "min_score 100%" in run("gate", "show", "--registry", reg).output
    out = run("train", "--task", "topics", "--data", two_tasks["topics"], "--eval-data", evalsets["topics"], *common,
              *sets()).output
    assert "rejected" in out
    full = run("history", "--registry", reg, "--all").output
    assert "topics@1" in full and "min_score" in full

    log = json.loads(run("log", "--registry", reg, "--json").output)
    assert any(e["action"] == "policy" for e in log)
    assert [e["to"] for e in log if e["action"] == "commit"] == ["active", "rejected"]

    run("promote", "topics@1", "--registry", reg, "--reason", "reviewed by hand")
    assert json.loads(run("list", "--registry", reg, "--json").output)[-1]["status"] == "active"
    bad = run("rollback", "topics", "--registry", reg, ok=False)
    assert bad.exit_code == 1 and "no earlier non-rejected version" in bad.output

    run("gate", "clear", "--registry", reg)
    run("train", "--task", "sentiment", "--data", two_tasks["sentiment"], *common, *sets(**{"eval.on_history": True}))
    hist = json.loads(run("history", "--registry", reg, "--json").output)
    assert hist["refs"] == ["topics@1", "sentiment@2"]  # re-training moves a task to the end
    assert hist["metrics"]["AA"] is not None and hist["metrics"]["BWT"] is not None
    assert "sentiment@1" in run("rollback", "sentiment", "--registry", reg, "--reason", "oops").output
    events = json.loads(run("log", "--registry", reg, "--task", "sentiment", "--json").output)
    assert events[-3]["reason"] == "rollback from sentiment@2: oops" and events[-1]["to"] == "rejected"
    assert {e["ref"].split("@")[0] for e in events} == {"sentiment"}
    assert "rollback" in run("log", "--registry", reg, "--limit", "3").output

    rep = tmp_path / "rep"
    run("report", "--registry", reg, "--out", rep)
    html = (rep / "index.html").read_text()
    assert len(list(rep.glob("heatmap_*.png"))) == 1 and "topics@1" in html and "min_score 100" in html
    score = f"{hist['R'][0][0]:.1f}"
    assert score in html


def test_eval_command_scores_and_records(tmp_path, tiny_base_path, two_tasks, evalsets) -> None:
    reg = tmp_path / "reg"
    run("registry", "init", reg)
    run("train", "--task", "sentiment", "--data", two_tasks["sentiment"], "--registry", reg, "--base-model",
        tiny_base_path, *sets())
    out = json.loads(run("eval", "--registry", reg, "--adapter", "sentiment", "--data", evalsets["sentiment"],
                         "--task", "sentiment", "--mode", "both", "--max-new-tokens", "auto", "--json").stdout)
    assert out["n"] == 8 and out["plan"] == {"composition": "adapter", "refs": ["sentiment@1"]}
    assert out["constrained"] is not None and out["rule"]["id"] == "cladapt-eval-1"
    shown = json.loads(run("show", "sentiment@1", "--registry", reg, "--json").output)
    assert shown["evaluations"]["eval-sentiment"]["score"] == out["score"]
    base = run("eval", "--data", evalsets["topics"], "--base-model", tiny_base_path).output
    assert "topics" in base and "exact_match" in base
    bad = run("eval", "--registry", reg, "--compose", "sum", "--data", evalsets["topics"], ok=False)
    assert bad.exit_code == 1 and "no active sum-composed" in bad.output


def _fake_benchmark(root: Path) -> Path:
    manifest = {"orders": {"o1": ["sentiment", "topics"], "o2": ["topics", "missing"]},
                "tasks": {"sentiment": {"labels": ["positive", "negative"]}, "topics": {"labels": ["sports", "business"]}}}
    for kind in ("sentiment", "topics"):
        write_jsonl((root / kind).mkdir(parents=True) or root / kind / "train.jsonl", task_rows(kind, 20))
        write_jsonl(root / kind / "test.jsonl", task_rows(kind, 10))
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_bench_cl_smoke_resumes_and_reports(tmp_path, tiny_base_path) -> None:
    data = _fake_benchmark(tmp_path / "clb")
    out = tmp_path / "results"
    args = ["bench", "cl", "--data-dir", data, "--order", "o1", "--profile", "smoke", "--methods", "lora,inc-lora,mtl",
            "--out", out, "--work-dir", tmp_path / "work", "--base-model", tiny_base_path, "--set", "lora.r=2", "--set", "train.batch_size=4",
            "--max-new-tokens", "auto"]  # the smoke profile's own budget, named
    bad = run(*args[:-1], "lots", ok=False)
    assert bad.exit_code == 2 and "positive number of tokens or 'auto'" in bad.output
    printed = run(*args).output
    assert "inc-lora" in printed
    res = json.loads((out / "cl_o1_smoke.json").read_text())
    assert res["tasks"] == ["sentiment", "topics"] and res["machine"]["torch"]
    assert res["command"] and res["machine"]["source"]["source"] in ("git", "package")  # recorded, git not run
    lora, inc, mtl = (res["cells"][m] for m in ("lora", "inc-lora", "mtl"))
    assert len(inc["R"]) == 2 and all(v is not None for row in inc["R"] for v in row)  # future tasks scored too
    assert lora["R"][1][0] == lora["R"][0][0]  # oracle routing: the first adapter is untouched
    assert lora["R"][0][1] == lora["b"][1]  # no adapter for the future task yet: the base model answers
    assert mtl["refs"] == ["mtl@1", "mtl@2"] and inc["constrained"] and inc["metrics"]["FWT"] is not None
    assert (out / "cl_o1_smoke" / "index.html").is_file() and (out / "cl_o1_smoke" / "heatmap_mtl.png").is_file()
    assert inc["wall_seconds"] >= inc["train_seconds"] + inc["eval_seconds"] - 1  # the versions' whole runs
    assert "ppl" not in inc  # no --ppl-data
    # every cell ran in a child process of its own, which wrote the cell's result file
    for m in ("lora", "inc-lora", "mtl"):
        child = json.loads((tmp_path / "work" / "cl_o1_smoke" / "cells" / f"{m}.train.json").read_text())
        assert child["status"] == "ok" and child["cells"][m]["R"] == res["cells"][m]["R"]
        assert res["cells"][m]["process"]["pid"] != os.getpid() and res["cells"][m]["process"]["max_rss_mb"] > 0
    assert len({res["cells"][m]["process"]["pid"] for m in ("lora", "inc-lora", "mtl")}) == 3
    # a second run reuses every cell; --ppl-data adds the general-perplexity column to finished cells
    before = json.loads((out / "cl_o1_smoke.json").read_text())["cells"]
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"a plain general sentence number {i}"} for i in range(6)])
    run(*args, "--ppl-data", general, "--ppl-samples", "4")
    after = json.loads((out / "cl_o1_smoke.json").read_text())["cells"]
    for m in ("lora", "inc-lora", "mtl"):
        assert {k: v for k, v in after[m].items() if not k.startswith("ppl")} == before[m]
        assert len(after[m]["ppl"]) == 2 and after[m]["ppl_base"] > 1 and after[m]["ppl_data"]["samples"] == 4
    assert after["inc-lora"]["ppl"][1] != after["inc-lora"]["ppl"][0]  # task 2's model is the sum of both adapters
    # results of other settings are never mixed into finished cells or registries
    changed = [a if a != "lora.r=2" else "lora.r=4" for a in args]
    bad = run(*changed, ok=False)
    assert bad.exit_code == 1 and "measured with other settings (lora.r)" in bad.output and "--fresh" in bad.output
    from cladapt.bench.cl_spec import config_changes
    from cladapt.config import load_config
    from cladapt.registry.store import Store

    store = Store.open(tmp_path / "work" / "cl_o1_smoke" / "registries" / "inc-lora")
    cfg = load_config(method="inc-lora", overrides=["lora.r=4"])[0]
    assert "lora.r" in config_changes(store.get("topics").manifest.config, cfg)
    bad = run("bench", "cl", "--data-dir", data, "--order", "o2", "--profile", "smoke", "--out", out, "--work-dir", tmp_path / "work", ok=False)
    assert bad.exit_code == 1 and "missing" in bad.output


def test_bench_cl_variants_parse_and_run(tmp_path, tiny_base_path) -> None:
    from cladapt.bench.cl_spec import EQUAL_BUDGET, parse_cell
    from cladapt.errors import ConfigError

    assert parse_cell("seq-lora") == ("seq-lora", EQUAL_BUDGET)
    assert parse_cell("olora+asd") == ("olora", [*EQUAL_BUDGET, "asd.enabled=true"])
    assert parse_cell("reglora+preset") == ("reglora", [])
    method, sets = parse_cell("inc-lora+asd+gere-lf", Path("c4.jsonl"))
    assert method == "inc-lora" and "replay.loss=lf" in sets and "replay.texts=c4.jsonl" in sets
    with pytest.raises(ConfigError, match="--replay-data"):
        parse_cell("seq-lora+gere-tm")
    with pytest.raises(ConfigError, match="unknown variant 'gere-xx'"):
        parse_cell("seq-lora+gere-xx", Path("c4.jsonl"))

    data = _fake_benchmark(tmp_path / "clb")
    # the variants replay 128 texts (a record made from fewer is refused by the next task)
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"plain general text number {i} about things"} for i in range(130)])
    out = tmp_path / "results"
    run("bench", "cl", "--data-dir", data, "--order", "o1", "--profile", "smoke", "--methods", "seq-lora+asd,inc-lora+gere-lf",
        "--replay-data", general, "--out", out, "--work-dir", tmp_path / "work", "--base-model", tiny_base_path,
        "--set", "lora.r=2", "--set", "train.batch_size=4", "--set", "asd.generator=none")
    cells = json.loads((out / "cl_o1_smoke.json").read_text())["cells"]
    assert cells["seq-lora+asd"]["config"]["method"]["name"] == "seq-lora" and len(cells["seq-lora+asd"]["R"]) == 2
    assert cells["inc-lora+gere-lf"]["config"]["method"]["name"] == "inc-lora"
    from cladapt.registry.store import Store

    # the variants' pipelines ran (not only their config was recorded): ASD's report, GeRe's record and
    # replay rows trained beside the task rows
    asd_store = Store.open(tmp_path / "work" / "cl_o1_smoke" / "registries" / "seq-lora+asd")
    for task in ("sentiment", "topics"):
        report = asd_store.read_json(asd_store.get(task).ref, "sidecars/asd.json")
        assert report["converted"] == round(16 * 0.2) and report["generator"] == "none"
        assert asd_store.get(task).manifest.train_stats["extra_rows"] == 0
    replay_store = Store.open(tmp_path / "work" / "cl_o1_smoke" / "registries" / "inc-lora+gere-lf")
    for task in ("sentiment", "topics"):
        rec = replay_store.get(task)
        usage = replay_store.read_json(rec.ref, "sidecars/gere.json")
        assert usage["loss"] == "lf" and usage["n_replay"] == 128 and usage["observed"]["batches_with_replay"] >= 1
        assert rec.manifest.train_stats["extra_rows"] == 128 and rec.manifest.train_stats["train_rows"] == 16 + 128
    bad = run("bench", "cl", "--data-dir", data, "--order", "o1", "--profile", "smoke", "--methods", "lora+gere-tm",
              "--out", out, "--work-dir", tmp_path / "work", ok=False)
    assert bad.exit_code != 0 and "--replay-data" in bad.output


def test_bench_cl_equal_budgets_and_the_labelled_preset_variant(tmp_path) -> None:
    from cladapt.bench.cl_spec import PROFILES, BenchSpec, cell_config, lora_label

    spec = BenchSpec(tmp_path, "o1", PROFILES["small"], [], tmp_path)
    shapes = {cell: cell_config(spec, cell).lora for cell in ("seq-lora", "olora", "inflora", "owlora", "reglora", "reglora+preset")}
    # every method at q,v r 8; RegLoRA's SEFE preset (all linear layers) only as the +preset variant
    assert {lora_label(s.model_dump()) for c, s in shapes.items() if c != "reglora+preset"} == {"q,v r8"}
    assert lora_label(shapes["reglora+preset"].model_dump()) == "q,k,v,o,gate,up,down r8"
    assert shapes["reglora"].alpha == shapes["reglora+preset"].alpha == 16  # the method's own scaling is kept
    assert shapes["inflora"].scaling == 1.0


def test_bench_cl_a_failed_cell_loses_only_itself(tmp_path, tiny_base_path) -> None:
    data = _fake_benchmark(tmp_path / "clb")
    no_text = write_jsonl(tmp_path / "bad-general.jsonl", [{"body": "no text field"}] * 3)
    out = tmp_path / "results"
    bad = run("bench", "cl", "--data-dir", data, "--order", "o1", "--profile", "smoke", "--methods", "seq-lora+gere-lf,lora",
              "--replay-data", no_text, "--out", out, "--work-dir", tmp_path / "work", "--base-model", tiny_base_path,
              "--set", "lora.r=2", "--set", "train.batch_size=4", ok=False)
    assert bad.exit_code == 1 and "1 of 2 cells failed" in bad.output and "seq-lora+gere-lf" in bad.output
    cells = json.loads((out / "cl_o1_smoke.json").read_text())["cells"]
    assert cells["seq-lora+gere-lf"]["status"] == "failed" and "text" in cells["seq-lora+gere-lf"]["error"]
    assert cells["lora"]["status"] == "done" and len(cells["lora"]["R"]) == 2  # the next cell ran in its own process
