"""The admission gate: policy, decisions, eval-on-history rows, rejection, audit, rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import task_rows, tiny_overrides, write_jsonl
from pydantic import ValidationError

from cladapt.config import load_config
from cladapt.errors import ConfigError, DataError
from cladapt.evaluation import gate as G
from cladapt.evaluation.accuracy_matrix import recorded_rows, square
from cladapt.registry.lifecycle import rollback
from cladapt.train import evaluation_hooks as H
from cladapt.train.run import train_task


def test_policy_parses_percentages_and_needs_ppl_data() -> None:
    p = G.GatePolicy(max_drop=2, max_ppl_rise="5%", ppl_data=["g.jsonl"], min_score=50)
    assert p.max_ppl_rise == 5.0 and p.active
    assert G.parse_percent(" 7.5 % ") == 7.5 and G.parse_percent(None) is None
    with pytest.raises(ValidationError, match="needs ppl_data"):
        G.GatePolicy(max_ppl_rise="5%")
    with pytest.raises(ValidationError):
        G.GatePolicy(max_dorp=2)  # type: ignore[call-arg]
    assert not G.GatePolicy().active


def test_decide_names_every_failed_threshold() -> None:
    p = G.GatePolicy(max_drop=2, min_score=60, max_ppl_rise=5, ppl_data=["x"])
    ok = G.decide(p, task="new", new_score=61.0, earlier={"old": (80.0, 78.5, "old@1")}, ppl=10.4, ppl_base=10.0)
    assert ok.admitted and ok.reasons == []
    bad = G.decide(p, task="new", new_score=40.0, earlier={"old": (80.0, 70.0, "old@1"), "other": (None, 50.0, None)},
                   ppl=11.0, ppl_base=10.0)
    assert not bad.admitted
    assert len(bad.reasons) == 3
    assert "min_score 60" in bad.reasons[0] and "drop 10.00 > max_drop 2" in bad.reasons[1]
    assert "+10.00%" in bad.reasons[2]
    unchecked = next(c for c in bad.checks if c.name == "max_drop:other")
    assert unchecked.passed is None  # no comparable earlier score: reported, not failed
    assert bad.to_json()["admitted"] is False


def test_policy_round_trips_through_the_store_and_is_audited(store) -> None:
    assert G.load_policy(store) is None
    G.save_policy(store, G.GatePolicy(max_drop=2.0), actor="tester")
    assert G.load_policy(store) == G.GatePolicy(max_drop=2.0)
    assert store.get_policy() == {"gate": {"max_drop": 2.0}}
    G.save_policy(store, None)
    assert G.load_policy(store) is None
    events = [e for e in store.audit_log() if e["action"] == "policy"]
    assert events[0]["actor"] == "tester" and events[0]["to"] == {"gate": {"max_drop": 2.0}}


def _cfg(tiny_base_path: Path, method: str = "lora", **extra: object):
    over = tiny_overrides(**{"eval.max_new_tokens": 3, "eval.batch_size": 8, **extra})
    return load_config(method=method, overrides=[*over, f"base_model={tiny_base_path}"])[0]


@pytest.fixture
def evalsets(tmp_path: Path) -> dict[str, Path]:
    return {k: write_jsonl(tmp_path / f"{k}-test.jsonl", task_rows(k, 8)) for k in ("sentiment", "topics")}


def test_make_after_train_is_none_without_eval_or_policy(store, tiny_base_path: Path) -> None:
    assert H.make_after_train(store, _cfg(tiny_base_path), "t", None) is None
    with pytest.raises(DataError, match="file not found"):  # before any training happens
        H.make_after_train(store, _cfg(tiny_base_path), "t", [str(tiny_base_path / "nope.jsonl")])
    with pytest.raises(DataError, match="perplexity not found"):
        H.make_after_train(store, _cfg(tiny_base_path, **{"eval.ppl_data": ["/nope.jsonl"], "eval.on_history": True}), "t", None)
    G.save_policy(store, G.GatePolicy(min_score=10))
    with pytest.raises(ConfigError, match="min_score needs"):
        H.make_after_train(store, _cfg(tiny_base_path), "t", None)


def test_eval_on_history_rows_gate_rejection_and_rollback(
    store, tiny_loaded, tiny_base_path, two_tasks, evalsets, tmp_path
) -> None:
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": "the film was great and the story was good"}] * 3)
    cfg = _cfg(tiny_base_path, **{"eval.on_history": True, "eval.ppl_data": [str(general)]})
    hook = H.make_after_train(store, cfg, "sentiment", [str(evalsets["sentiment"])])
    first = train_task(store, "sentiment", [str(two_tasks["sentiment"])], cfg, after_train=hook, loaded=tiny_loaded)
    row = first.manifest.metrics["eval"]
    assert first.status == "active" and set(row["scores"]) == {"sentiment"}
    assert row["ppl"]["samples"] == 3 and row["ppl"]["value"] > 1 and row["ppl"]["base"] > 1
    assert first.manifest.metrics["ppl"] == row["ppl"]["value"]
    assert row["eval_data"]["sentiment"]["files"] == [str(evalsets["sentiment"].resolve())]
    assert row["baseline"]["sentiment"]["n"] == 8 and row["before"]["sentiment"]["adapters"] == []
    assert row["rule"]["id"] == "cladapt-eval-1" and row["composition"] == "route"
    assert first.manifest.metrics["score"] == row["scores"]["sentiment"]["score"]

    # a gate no model can pass: the new version is committed, but as rejected, with its reasons
    G.save_policy(store, G.GatePolicy(min_score=100.0, max_drop=0.0, max_ppl_rise="900%", ppl_data=[str(general)]))
    cfg = _cfg(tiny_base_path, **{"eval.on_history": True})  # the perplexity data comes from the policy
    hook = H.make_after_train(store, cfg, "topics", [str(evalsets["topics"])])
    second = train_task(store, "topics", [str(two_tasks["topics"])], cfg, after_train=hook, loaded=tiny_loaded)
    assert second.status == "rejected"
    gate = second.manifest.metrics["gate"]
    assert not gate["admitted"] and "min_score 100" in gate["reasons"][0]
    # oracle routing: the earlier task's adapter is unchanged, so its recorded score is re-used
    hist = second.manifest.metrics["eval"]["scores"]["sentiment"]
    assert hist["reused_from"] == "sentiment@1" and hist["score"] == row["scores"]["sentiment"]["score"]
    drop = next(c for c in gate["checks"] if c["name"] == "max_drop:sentiment")
    assert drop["passed"] is True and drop["value"] == 0.0
    ppl = next(c for c in gate["checks"] if c["name"] == "max_ppl_rise")
    assert ppl["passed"] is True and second.manifest.metrics["eval"]["ppl"]["base"] == row["ppl"]["base"]  # cached
    commit = [e for e in store.audit_log() if e["action"] == "commit"][-1]
    assert commit["to"] == "rejected" and commit["reason"].startswith("gate: topics: score")
    # the baseline of sentiment was computed once and re-used
    assert second.manifest.metrics["eval"]["baseline"]["sentiment"] == row["baseline"]["sentiment"]

    # the rejected row is listed but never enters the metrics
    rows = recorded_rows(store)
    assert [r.ref for r in rows] == ["sentiment@1", "topics@1"]
    view = square(rows)
    assert view.tasks == ["sentiment"] and view.R == [[row["scores"]["sentiment"]["score"]]]

    # retrain sentiment (gate off), then roll it back to v1
    G.save_policy(store, None)
    hook = H.make_after_train(store, cfg, "sentiment", None)  # eval data re-used from v1's record
    third = train_task(store, "sentiment", [str(two_tasks["sentiment"])], cfg, after_train=hook, loaded=tiny_loaded)
    assert third.status == "active" and third.version == 2
    assert third.manifest.metrics["eval"]["before"]["sentiment"]["adapters"] == ["sentiment@1"]
    assert store.get("sentiment@1").status == "archived"
    back = rollback(store, "sentiment", actor="tester")
    assert str(back.ref) == "sentiment@1" and back.status == "active"
    assert store.get("sentiment@2").status == "rejected"
    last = store.audit_log()[-3:]
    assert [(e["ref"], e["to"]) for e in last] == [
        ("sentiment@1", "active"), ("sentiment@2", "archived"), ("sentiment@2", "rejected")
    ]
    assert all(e["actor"] == "tester" for e in last)
    with pytest.raises(Exception, match="no earlier"):
        rollback(store, "sentiment")


def test_sum_methods_see_the_raw_base_for_the_baseline(store, tiny_loaded, tiny_base_path, two_tasks, evalsets) -> None:
    """For sum methods the base weights hold the folded earlier adapters; b[i] must not."""
    from cladapt.evaluation.history_eval import raw_base

    model, tok, _ = tiny_loaded
    probe = tok("the film was great", return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**probe).logits.clone()
    cfg = _cfg(tiny_base_path, "inc-lora", **{"lora.r": 2})
    train_task(store, "sentiment", [str(two_tasks["sentiment"])], cfg, loaded=tiny_loaded)
    seen: dict[str, torch.Tensor] = {}

    def after(trained) -> None:
        peft_model, folded = trained.model, trained.folded  # what the run folded, handed to evaluation
        assert len(folded) == 1
        with torch.no_grad(), peft_model.disable_adapter():
            seen["folded"] = peft_model(**probe).logits.clone()
        with torch.no_grad(), raw_base(peft_model, folded):
            seen["raw"] = peft_model(**probe).logits.clone()
        with torch.no_grad(), peft_model.disable_adapter():
            seen["restored"] = peft_model(**probe).logits.clone()

    train_task(store, "topics", [str(two_tasks["topics"])], cfg, after_train=after, loaded=tiny_loaded)
    assert (seen["folded"] - base_logits).abs().max() > 1e-4  # the earlier adapter is really folded in
    assert torch.allclose(seen["raw"], base_logits, atol=1e-5)
    assert torch.equal(seen["restored"], seen["folded"])


def test_eval_every_records_curves_and_the_stability_gap(store, tiny_loaded, tiny_base_path, two_tasks, evalsets) -> None:
    from cladapt.train.evaluation_hooks import continual_extension

    cfg = _cfg(tiny_base_path, "inc-lora", **{"lora.r": 2})
    assert continual_extension(store, cfg, "sentiment", None) is None  # eval.every = 0: off
    hook = H.make_after_train(store, cfg, "sentiment", [str(evalsets["sentiment"])])
    train_task(store, "sentiment", [str(two_tasks["sentiment"])], cfg, after_train=hook, loaded=tiny_loaded)
    cfg = _cfg(tiny_base_path, "inc-lora", **{"lora.r": 2, "eval.every": 1, "eval.samples": 4})
    ext = continual_extension(store, cfg, "topics", [str(evalsets["topics"])])
    rec = train_task(store, "topics", [str(two_tasks["topics"])], cfg, extensions=[ext], loaded=tiny_loaded)
    curves = store.read_json(f"{rec.task}@{rec.version}", "continual_eval")
    assert [p["kind"] for p in curves["points"]] == ["start", "step", "step", "step"]
    assert [p["step"] for p in curves["points"]] == [0, 1, 2, 3]
    assert set(curves["points"][0]["scores"]) == {"sentiment", "topics"} and curves["samples"]["topics"] == 4
    summary = rec.manifest.metrics["continual"]
    start = curves["points"][0]["scores"]["sentiment"]
    low = min(p["scores"]["sentiment"] for p in curves["points"][1:])
    assert summary["stability_gap"]["sentiment"] == pytest.approx(start - low)
    assert len(summary["wc_acc"]) == 3
