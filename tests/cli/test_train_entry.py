"""`cladapt train` and `cladapt forget` go through the one library entry point, train_from_config."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli_run, set_args, task_rows, write_jsonl

run = cli_run


def test_forget_is_evaluated_not_gated_and_methods_match_their_command(tmp_path: Path, tiny_base_path: Path,
                                                                        two_tasks: dict[str, Path]) -> None:
    reg = tmp_path / "reg"
    common = ["--registry", reg, "--base-model", tiny_base_path]
    run("registry", "init", reg)
    evalset = write_jsonl(tmp_path / "sentiment-test.jsonl", task_rows("sentiment", 6))
    run("train", "--task", "sentiment", "--data", two_tasks["sentiment"], "--eval-data", evalset, *common,
        *set_args(**{"eval.max_new_tokens": 3}))
    run("gate", "set", "--registry", reg, "--max-drop", "0")
    sets = set_args(**{"eval.max_new_tokens": 3, "eval.on_history": True, "method.eval_batches": 1,
                       "lora.target_modules": ["gate_proj", "up_proj", "down_proj"]})
    run("forget", "--task", "forget-sentiment", "--forget", two_tasks["sentiment"], "--retain", two_tasks["topics"],
        *common, *sets)
    manifest = json.loads(run("show", "forget-sentiment@1", "--registry", reg, "--json").output)
    # evaluated on every earlier task (eval.on_history), but a forgetting version is not gated
    assert manifest["metrics"]["eval"]["scores"]["sentiment"]["score"] is not None and "gate" not in manifest["metrics"]
    listed = json.loads(run("list", "--registry", reg, "--json").output)
    assert {(r["task"], r["version"]): r["status"] for r in listed}[("forget-sentiment", 1)] == "active"
    forget_info = json.loads((reg / "tasks" / "forget-sentiment" / "v1" / "sidecars" / "forget_data.json").read_text())
    assert forget_info["rows"] == 16 and forget_info["files"] == [str(two_tasks["sentiment"].resolve())]
    # a method goes with its command
    bad = run("forget", "--task", "x", "--forget", two_tasks["sentiment"], "--retain", two_tasks["topics"],
              "--method", "inc-lora", *common, *set_args(), ok=False)
    assert bad.exit_code == 1 and "takes no forget data" in bad.output
    bad = run("train", "--task", "x", "--data", two_tasks["topics"], "--method", "gslora", *common, *set_args(), ok=False)
    assert bad.exit_code == 1 and "needs forget data" in bad.output
