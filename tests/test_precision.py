"""Mixed precision: resolution per device, autocast, and that scores and training record it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_run, set_args

from cladapt import precision as P
from cladapt.errors import ConfigError


def test_resolve_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert P.resolve("no", "cpu") == "no" and P.resolve("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="CUDA"):
        P.resolve("fp16", "cpu")
    with pytest.raises(ConfigError, match="unknown value"):
        P.resolve("int4", "cpu")
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: False)
    assert P.resolve("auto", "cpu") == "no"  # emulated bf16 would be slower than fp32
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    assert P.resolve("auto", "cpu") == "bf16"


def test_autocast_changes_matmul_dtype_only_when_asked() -> None:
    a = torch.ones(4, 4)
    with P.autocast("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with P.autocast("no", "cpu"):
        assert (a @ a).dtype == torch.float32


def test_evaluate_records_precision_and_keys_scores_apart(tiny_loaded) -> None:
    from cladapt import evaluation as E
    from cladapt.data.rows import Example
    from cladapt.evaluation.accuracy_matrix import score_key

    model, tok, _ = tiny_loaded
    rows = [Example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": g}], "mem", i)
            for i, g in enumerate(["yes", "no", "yes", "no"])]
    es = E.eval_set_from_examples("t", rows, labels=["yes", "no"])
    fp32 = E.evaluate(model, tok, es, mode="both", max_new_tokens=3)
    bf16 = E.evaluate(model, tok, es, mode="both", max_new_tokens=3, precision="bf16")
    assert fp32.precision == "no" and bf16.precision == "bf16"
    assert bf16.constrained is not None and bf16.format_rate is not None
    k32, k16 = (score_key(r.to_json(), E.rule(3), "both") for r in (fp32, bf16))
    assert k32 != k16  # a cached fp32 baseline is never compared with bf16 scores
    ppl32 = E.perplexity(model, tok, ["a short text", "another one here"])
    ppl16 = E.perplexity(model, tok, ["a short text", "another one here"], precision="bf16")
    assert ppl16 == pytest.approx(ppl32, rel=0.05) and ppl16 != ppl32


def test_training_under_bf16_keeps_fp32_adapter(tmp_path: Path, tiny_base_path: Path, two_tasks) -> None:
    from safetensors import safe_open

    from cladapt.config import load_config
    from cladapt.train.trainer_setup import training_arguments

    cfg = load_config(overrides=["train.mixed_precision=bf16"])[0]
    assert training_arguments(cfg, tmp_path / "o", steps_per_epoch=1).bf16
    assert not training_arguments(load_config()[0], tmp_path / "o", steps_per_epoch=1).bf16
    reg = tmp_path / "reg"
    cli_run("registry", "init", reg)
    cli_run("train", "--registry", reg, "--task", "sentiment", "--data", two_tasks["sentiment"],
            "--base-model", tiny_base_path, *set_args(**{"train.mixed_precision": "bf16"}))
    shown = json.loads(cli_run("show", "--registry", reg, "sentiment", "--json").output)
    assert shown["config"]["train"]["mixed_precision"] == "bf16"
    weights = next((reg / "tasks").rglob("adapter_model.safetensors"))
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
