"""The README's vision-language commands on a tiny LLaVA, and ASD on VQA rows.

``cladapt train --base-model VLM --task vqa --data vqa.jsonl --method reglora --asd``, then
``cladapt eval`` on held-out image rows and ``cladapt generate --image``; a second task and a
CL method make a 2-task sequence, and the history keeps both.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli_run, set_args
from tiny_vlm import write_image
from vision_helpers import image_task_rows, write_rows


def test_readme_commands_train_eval_generate_with_images(vlm_paths: dict[str, Path], tmp_path: Path) -> None:
    base = vlm_paths["llava"]
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    vqa = write_rows(tmp_path / "vqa.jsonl", image_task_rows("colour", tmp_path))
    test = write_rows(tmp_path / "vqa_test.jsonl", image_task_rows("colour", tmp_path / "held-out", n=4))
    shapes = write_rows(tmp_path / "shapes.jsonl", image_task_rows("shape", tmp_path, chat=True))

    check = cli_run("data", "check", vqa, "--base-model", base, "--json")
    assert json.loads(check.stdout)["rows"] == 8

    cli_run("train", "--registry", reg, "--base-model", base, "--task", "vqa", "--data", vqa, "--method", "reglora",
            "--asd", *set_args(**{"asd.percent": 50, "train.max_steps": 2, "train.max_length": 128}))
    version = reg / "tasks" / "vqa"
    asd_json = next(version.rglob("asd.json"))
    report = json.loads(asd_json.read_text())
    assert report["rows"] == 8 and sum(report["counts"].values()) >= 1, report
    cli_run("train", "--registry", reg, "--base-model", base, "--task", "shapes", "--data", shapes,
            "--method", "reglora", *set_args(**{"train.max_steps": 2, "train.max_length": 128}))

    scored = cli_run("eval", "--registry", reg, "--adapter", "vqa", "--data", test, "--mode", "both",
                     "--max-new-tokens", "3", "--json")
    result = json.loads(scored.stdout)
    assert result["n"] == 4 and result["constrained"] is not None and result["plan"]["refs"] == ["vqa@1"]

    photo = write_image(tmp_path / "photo.png", (30, 30, 220), shape="circle")
    out = cli_run("generate", "--registry", reg, "--adapter", "vqa", "--image", photo, "--max-new-tokens", "3",
                  "What is on the table?")
    assert "What is on the table?" in out.output
    missing = cli_run("generate", "--registry", reg, "--adapter", "vqa", "--image", tmp_path / "nope.png", "Hi", ok=False)
    assert missing.exit_code != 0 and "nope.png" in missing.output and "not found" in missing.output

    listed = cli_run("list", "--registry", reg, "--json")
    assert {r["task"] for r in json.loads(listed.stdout)} == {"vqa", "shapes"}


def test_asd_rewrites_vqa_rows_and_keeps_their_images(tmp_path: Path) -> None:
    from cladapt.data.rows import load_examples
    from cladapt.train.asd import asd

    rows = load_examples([write_rows(tmp_path / "vqa.jsonl", image_task_rows("colour", tmp_path, n=10))]).examples
    seen: list[tuple[str, ...]] = []

    def writer(requests):  # an explanation writer that records what it was shown
        seen.extend(r.images for r in requests)
        return [f"the shape is painted {r.gold}" for r in requests]

    result = asd(rows, percent=100, seed=0, generator=writer, generator_id="test")
    styles = {ex.meta.get("style") for ex in result.examples}
    assert {"MCQ", "YN"} & styles
    for before, after in zip(rows, result.examples, strict=True):
        assert after.images == before.images and after.images
    assert seen and all(len(s) == 1 for s in seen)
