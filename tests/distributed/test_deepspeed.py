"""``cladapt train --deepspeed zero2`` with 2 CPU processes (DeepSpeed's CPU accelerator over gloo).

Runs where the ``deepspeed`` extra is installed (on a machine without CUDA: ``DS_BUILD_OPS=0``; the
first run JIT-compiles DeepSpeed's shared-memory communication op, minutes, cached afterwards).
Proves: one version, 2 processes inside the run, and the adapter a single process trains without
DeepSpeed on the same global batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import cli_run, set_args, task_rows, write_jsonl

sys.path.insert(0, str(Path(__file__).parent))
from launching import assert_same_adapter, launch, only_version, torchrun  # noqa: E402

pytestmark = pytest.mark.multiprocess


def test_zero2_two_processes_equal_one_process(tmp_path: Path, tiny_base_path: Path) -> None:
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    rows = write_jsonl(tmp_path / "sentiment.jsonl", task_rows("sentiment", 16))
    common = ["train", "--task", "sentiment", "--data", rows, "--base-model", tiny_base_path]
    two, one = tmp_path / "two", tmp_path / "one"
    for reg in (two, one):
        cli_run("registry", "init", reg)
    launch(torchrun(), [*common, "--registry", two, "--deepspeed", "zero2", *set_args(**{"train.batch_size": 4})],
           tmp_path)
    cli_run(*common, "--registry", one, *set_args(**{"train.batch_size": 8}))
    m2, v2 = only_version(two, "sentiment")
    _, v1 = only_version(one, "sentiment")
    assert m2["train_stats"]["processes"] == 2
    assert m2["config"]["train"]["deepspeed"].endswith("zero2.json")
    assert_same_adapter(v1, v2)
