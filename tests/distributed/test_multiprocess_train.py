"""``cladapt train`` under torchrun / accelerate launch with 2 CPU processes (gloo) vs one process.

What is proven, through the registries the runs leave:

* the run trains as ONE job of 2 processes (``train_stats.processes`` is the process-group size
  seen inside the run) and commits exactly one version (no superseded duplicate);
* the committed adapter equals the one a single process trains with the same global batch
  (2 x 4 rows vs 1 x 8 rows, same seed, rows with equal answer lengths so the per-process mean
  losses average to the global one) up to float summation order;
* InfLoRA's data-derived state is pooled across processes: the designed ``A`` (from the input
  covariance before training), the grown bases (from the covariance after training) and the token
  count they were computed over equal those of the single-process run.

Each launch starts 2 Python processes that import torch and transformers (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_run, set_args, task_rows, write_jsonl
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from launching import accelerate_launch, assert_same_adapter, launch, only_version, torchrun  # noqa: E402

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "sentiment.jsonl", task_rows("sentiment", 16))


def test_torchrun_inflora_commits_once_and_pools_covariances(tmp_path: Path, tiny_base_path: Path, rows: Path) -> None:
    common = ["train", "--task", "sentiment", "--data", rows, "--method", "inflora", "--base-model", tiny_base_path]
    two, one = tmp_path / "two", tmp_path / "one"
    for reg in (two, one):
        cli_run("registry", "init", reg)
    out = launch(torchrun(), [*common, "--registry", two, *set_args(**{"train.batch_size": 4})], tmp_path)
    cli_run(*common, "--registry", one, *set_args(**{"train.batch_size": 8}))

    m2, v2 = only_version(two, "sentiment")
    m1, v1 = only_version(one, "sentiment")
    assert (m2["train_stats"]["processes"], m1["train_stats"]["processes"]) == (2, 1)
    assert m2["train_stats"]["global_batch"] == m1["train_stats"]["global_batch"] == 8
    assert m2["train_stats"]["steps"] == m1["train_stats"]["steps"] == 3
    assert out.count("committed as active") == 1  # process 0 alone reports
    assert_same_adapter(v1, v2)
    # the designed A comes from the pooled pre-training covariance: equal row spaces
    s1 = load_file(str(v1 / "adapter" / "adapter_model.safetensors"))
    s2 = load_file(str(v2 / "adapter" / "adapter_model.safetensors"))
    for key in (k for k in s1 if ".lora_A." in k):
        p1, p2 = (s[key].double().T @ s[key].double() for s in (s1, s2))  # projector-like, sign-free
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-6, msg=key)
    # the grown bases come from the pooled post-training covariance over all 16 rows' tokens
    j1, j2 = (json.loads((v / "sidecars" / "bases.json").read_text()) for v in (v1, v2))
    assert j2["tokens"] == j1["tokens"] > 0
    assert {k: v["k"] for k, v in j2["keys"].items()} == {k: v["k"] for k, v in j1["keys"].items()}
    b1, b2 = (load_file(str(v / "sidecars" / "bases.safetensors")) for v in (v1, v2))
    for key in (k for k in b1 if k.endswith(".U")):
        q1, q2 = (b[key].double() @ b[key].double().T for b in (b1, b2))
        torch.testing.assert_close(q2, q1, rtol=1e-4, atol=1e-5, msg=key)


def test_accelerate_launch_lora_equals_one_process_with_the_same_global_batch(
    tmp_path: Path, tiny_base_path: Path, rows: Path
) -> None:
    if shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").is_file():
        pytest.skip("accelerate launcher not installed")
    common = ["train", "--task", "sentiment", "--data", rows, "--base-model", tiny_base_path]
    two, one = tmp_path / "two", tmp_path / "one"
    for reg in (two, one):
        cli_run("registry", "init", reg)
    out = launch(accelerate_launch(), [*common, "--registry", two, *set_args(**{"train.batch_size": 4})], tmp_path)
    cli_run(*common, "--registry", one, *set_args(**{"train.batch_size": 8}))
    m2, v2 = only_version(two, "sentiment")
    _, v1 = only_version(one, "sentiment")
    assert m2["train_stats"]["processes"] == 2
    assert "training the 2 processes together on CPU" in out  # the CPU flag was missing and set by the run
    assert_same_adapter(v1, v2)
