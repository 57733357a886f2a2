"""``cladapt data check``, ``cladapt asd preview`` and ``cladapt replay init|show`` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result
from conftest import task_rows, write_jsonl

from cladapt.cli import cli


def run(*args: object, code: int = 0) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def test_data_check_ok_and_json(tmp_path: Path, tiny_base_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", task_rows("sentiment", 12) + task_rows("sentiment", 2))
    out = run("data", "check", path, "--base-model", tiny_base_path)
    assert "14 rows" in out.output and "data OK" in out.output and "2 duplicate rows" in out.output
    report = json.loads(run("data", "check", path, "--no-tokens", "--json").stdout)
    assert report["ok"] and report["rows"] == 14 and report["labels"]["top"] == {"positive": 7, "negative": 7}
    assert [d["where"] for d in report["duplicates"]] == [f"{path}:13", f"{path}:14"]
    assert "tokens" not in report


def test_data_check_bad_file_exits_nonzero(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", task_rows("topics", 3))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q"}])
    out = run("data", "check", good, bad, "--no-tokens", code=1)
    assert f"{bad}:2: missing field 'output'" in out.output
    issues = json.loads(run("data", "check", bad, "--json", "--no-tokens", code=1).stdout)["issues"]
    assert issues == [f"{bad}:2: missing field 'output'"]


def test_asd_preview(tmp_path: Path, tiny_base_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", task_rows("topics", 40))
    shown = json.loads(run("asd", "preview", path, "--n", "4", "--base-model", tiny_base_path, "--json").stdout)
    assert len(shown["rows"]) == 4 and {r["style"] for r in shown["rows"]} == {"YN", "MCQ"}
    assert all(r["converted"] and r["planned"] == r["style"] for r in shown["rows"])
    assert shown["report"]["redistributed"]["to"] == ["YN", "MCQ"]
    text = run("asd", "preview", path, "--n", "2", "--base-model", tiny_base_path).output
    assert "assistant:" in text and "BE/DE quota" in text
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (out1, out2):
        run("asd", "preview", path, "--base-model", tiny_base_path, "--seed", "3", "--output", out)
    assert out1.read_bytes() == out2.read_bytes()
    from cladapt.data.rows import load_examples

    rows = load_examples([out1]).examples  # the converted file is valid training data
    assert len(rows) == 40 and sum("style" in r.meta for r in rows) == 8


def test_asd_preview_with_base_generator(tmp_path: Path, tiny_base_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", task_rows("topics", 20))
    shown = json.loads(run("asd", "preview", path, "--n", "4", "--generator", "base",
                           "--base-model", tiny_base_path, "--json").stdout)
    assert shown["report"]["generator"].startswith("base:") and shown["report"]["redistributed"] is None
    assert {r["planned"] for r in shown["rows"]} == {"YN", "MCQ", "BE", "DE"}
    for r in shown["rows"]:
        assert r["converted"] == (r["where"] not in {s["where"] for s in shown["report"]["skipped"]})


def test_replay_init_show_force(tmp_path: Path, tiny_base_path: Path) -> None:
    reg = tmp_path / "reg"
    run("registry", "init", reg)
    texts = write_jsonl(tmp_path / "g.jsonl", [{"text": f"the film was great {i} and the plot"} for i in range(5)])
    out = run("replay", "init", "--registry", reg, "--base-model", tiny_base_path, "--texts", texts,
              "--max-tokens", "6", "--states")
    assert "recorded 5 texts" in out.output
    err = run("replay", "init", "--registry", reg, "--base-model", tiny_base_path, "--texts", texts, code=1)
    assert "--force" in err.output
    run("replay", "init", "--registry", reg, "--base-model", tiny_base_path, "--self-generate", "2",
        "--max-tokens", "6", "--force")
    records = json.loads(run("replay", "show", "--registry", reg, "--json", "--texts", "1").stdout)
    assert len(records) == 1
    rec = records[0]
    assert rec["n"] == 2 and rec["source"]["kind"] == "self-generated" and rec["states"] is False
    assert rec["base"]["id"] == str(tiny_base_path) and len(rec["texts"]) == 1
    assert "2 texts" in run("replay", "show", "--registry", reg, "--base-model", tiny_base_path).output
    usage = run("replay", "init", "--registry", reg, "--base-model", tiny_base_path, code=2)
    assert "exactly one of" in usage.output


def test_train_with_asd_and_replay_flags(tmp_path: Path, tiny_base_path: Path, two_tasks: dict[str, Path]) -> None:
    from conftest import tiny_overrides

    reg = tmp_path / "reg"
    run("registry", "init", reg)
    texts = write_jsonl(tmp_path / "g.jsonl", [{"text": f"the film was great {i} and the plot"} for i in range(5)])
    sets = [x for item in tiny_overrides(**{"replay.texts": str(texts), "replay.max_tokens": 6})
            for x in ("--set", item)]
    run("train", "--registry", reg, "--task", "sentiment", "--data", two_tasks["sentiment"], "--base-model",
        tiny_base_path, "--asd", "--asd-generator", "none", "--replay", "general", "--replay-ratio", "0.25", *sets)
    shown = json.loads(run("show", "--registry", reg, "sentiment@1", "--json").stdout)
    paths = {f["path"] for f in shown["files"]}
    assert {"sidecars/asd.json", "sidecars/gere.json"} <= paths
    assert shown["config"]["replay"]["ratio"] == 0.25 and shown["config"]["asd"]["enabled"] is True
    assert "5 texts" in run("replay", "show", "--registry", reg).output
