"""Routing end to end on the tiny model, through the CLI: signatures written at training, `route`,
`generate --router`, `eval --router`, `route eval`, and `route index` for a registry from before routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_run, set_args, task_rows, write_jsonl

from cladapt.features import SIGNATURE_KIND

SENTIMENT = "What is the sentiment of the following paragraph? Option: positive, negative\nthe film was great 99"
TOPICS = "What is the topic of the following paragraph? Option: sports, business\nthe company does business 7"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_base_path: Path) -> dict[str, Path]:
    """A registry with two routed (lora) tasks trained on the tiny model, shared by this module."""
    tmp = tmp_path_factory.mktemp("routing")
    files = {k: write_jsonl(tmp / f"{k}.jsonl", task_rows(k)) for k in ("sentiment", "topics")}
    reg = tmp / "reg"
    cli_run("registry", "init", reg)
    for task, f in files.items():
        cli_run("train", "--registry", reg, "--task", task, "--data", f, "--base-model", tiny_base_path, *set_args())
    return {"reg": reg, **files}


def test_training_writes_a_signature_with_every_space(trained) -> None:
    from cladapt.registry.store import Store
    from cladapt.serve.routers.candidates import read_signature

    store = Store.open(trained["reg"])
    rec = store.get("sentiment")
    assert rec.manifest.file("sidecars/signature.safetensors") is not None
    sig = read_signature(store, rec)
    assert sig is not None and sig.base.shape == (16, 64) and sig.own is not None and sig.encoder is not None
    assert sig.encoder.shape == (16, 384) and sig.labels[:2] == ["positive", "negative"]
    assert not __import__("torch").allclose(sig.base, sig.own)  # the trained adapter moves the embeddings


@pytest.mark.parametrize("router", ["dtkr", "mos", "lda"])
def test_route_picks_each_tasks_adapter(trained, router) -> None:
    out = cli_run("route", "--registry", trained["reg"], "--router", router, "--json", SENTIMENT, TOPICS).stdout
    routes = json.loads(out)
    assert [r["adapters"][0]["ref"] for r in routes] == ["sentiment@1", "topics@1"]
    for r in routes:
        assert set(r["scores"]) == {"sentiment@1", "topics@1"}
        assert abs(sum(a["weight"] for a in r["adapters"]) - 1.0) < 1e-6
    text = cli_run("route", "--registry", trained["reg"], "--router", router, SENTIMENT).output
    assert "-> sentiment@1 (1.00)" in text and "scores:" in text


def test_jare_top_k_mixes_both_adapters(trained) -> None:
    out = cli_run("route", "--registry", trained["reg"], "--router", "dtkr", "--set", "retrieve=8", "--top-k", "2", "--json",
                  SENTIMENT).stdout
    (route,) = json.loads(out)
    assert [a["ref"] for a in route["adapters"]][0] == "sentiment@1"
    assert abs(sum(a["weight"] for a in route["adapters"]) - 1.0) < 1e-6


def test_generate_with_a_router_shows_the_adapter_it_used(trained) -> None:
    out = cli_run("generate", "--registry", trained["reg"], "--router", "dtkr", "--max-new-tokens", "3",
                  SENTIMENT, TOPICS).output
    assert "-> sentiment@1" in out and "-> topics@1" in out and out.count("answer:") == 2


def test_eval_and_route_eval_with_routers(trained) -> None:
    out = json.loads(cli_run("eval", "--registry", trained["reg"], "--router", "dtkr", "--data", trained["sentiment"],
                             "--data", trained["topics"], "--max-new-tokens", "2", "--json").stdout)
    assert set(out["tasks"]) == {"sentiment", "topics"} and out["n"] == 32
    assert out["routing"]["accuracy"] == 100.0 and out["tasks"]["topics"]["routed_to"] == {"topics": 16}
    acc = json.loads(cli_run("route", "eval", "--registry", trained["reg"], "--router", "dtkr,mos,oracle",
                             "--data", trained["sentiment"], "--data", trained["topics"], "--json").stdout)
    assert [a["router"] for a in acc] == ["dtkr", "mos", "oracle"]
    assert all(a["accuracy"] == 100.0 and a["confusion"]["sentiment"] == {"sentiment": 16} for a in acc)


def test_bad_router_settings_name_the_key(trained) -> None:
    res = cli_run("route", "--registry", trained["reg"], "--router", "dtkr", "--set", "retreive=3", SENTIMENT, ok=False)
    assert res.exit_code == 1 and "retreive" in res.output and "retrieve" in res.output
    res = cli_run("route", "--registry", trained["reg"], "--router", "dtrk", SENTIMENT, ok=False)
    assert res.exit_code == 1 and "did you mean 'dtkr'" in res.output


def _commit_without_signature(store, base_path: Path, task: str, seed: int, composition: str = "route") -> str:
    """A version as committed before routing existed: a trained-looking LoRA, no signature sidecar."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cladapt.base_model import load

    model, _, info = load(str(base_path))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # B != 0, so the adapter changes the embeddings
    with store.stage(task) as staging:
        peft_model.save_pretrained(str(staging.adapter_dir))
        staging.manifest_fields.update(
            method="lora" if composition == "route" else "inc-lora", method_config={"name": "lora"},
            composition=composition, base_model=info.as_dict(),
            lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            data={"files": [], "sha256": "0" * 64, "rows": 16}, config={}, seed=0, parents=[],
            train_stats={"steps": 0}, metrics={},
        )
        store.commit(staging)
    return f"{task}@1"


def test_route_index_brings_an_old_registry_to_routing(tmp_path, tiny_base_path, trained) -> None:
    from cladapt.registry.store import Store

    reg = tmp_path / "old"
    store = Store.init(reg)
    for seed, task in enumerate(("sentiment", "topics")):
        _commit_without_signature(store, tiny_base_path, task, seed)
    versions_before = {p: p.read_bytes() for p in (reg / "tasks").rglob("*") if p.is_file()}
    res = cli_run("route", "--registry", reg, SENTIMENT, ok=False)
    assert res.exit_code == 1 and "route index --task sentiment" in res.output
    for task in ("sentiment", "topics"):
        out = cli_run("route", "index", "--registry", reg, "--task", task, "--data", trained[task]).output
        assert f"indexed {task}@1: 16 prompts (base, own, encoder)" in out
    assert (reg / "shared" / SIGNATURE_KIND / "sentiment-v1" / "signature.safetensors").is_file()
    assert {p: p.read_bytes() for p in (reg / "tasks").rglob("*") if p.is_file()} == versions_before  # immutable
    routes = json.loads(cli_run("route", "--registry", reg, "--json", SENTIMENT, TOPICS).stdout)
    assert [r["adapters"][0]["ref"] for r in routes] == ["sentiment@1", "topics@1"]
    again = cli_run("route", "index", "--registry", reg, "--task", "topics", "--data", trained["topics"], ok=False)
    assert again.exit_code == 1 and "--force" in again.output
    own = cli_run("route", "index", "--registry", trained["reg"], "--task", "topics", "--data", trained["topics"], ok=False)
    assert own.exit_code == 1 and "already has the signature" in own.output


def test_route_eval_on_a_benchmark_folder_and_route_list(trained, tmp_path) -> None:
    for task in ("sentiment", "topics"):
        rows = [{**r, "task": task} for r in task_rows(task, 6)]
        (tmp_path / "pack" / task).mkdir(parents=True)
        write_jsonl(tmp_path / "pack" / task / "test.jsonl", rows)
    out = cli_run("route", "eval", "--registry", trained["reg"], "--data-dir", tmp_path / "pack",
                  "--tasks", "sentiment,topics", "--router", "dtkr", "--no-instruction", "--json").stdout
    (run,) = json.loads(out)
    assert run["n"] == 12 and set(run["confusion"]) == {"sentiment", "topics"}
    table = cli_run("route", "eval", "--registry", trained["reg"], "--data-dir", tmp_path / "pack", "--limit", "3").output
    assert "routing accuracy" in table and "lda: confusion" in table  # the default router
    listed = cli_run("route", "list").output
    assert all(name in listed for name in ("oracle", "dtkr", "mos", "arrow", "sum")) and "retrieve = 2" in listed


def test_sum_router_applies_every_sum_composed_version(tmp_path, tiny_base_path) -> None:
    from cladapt.registry.store import Store

    reg = tmp_path / "sum"
    store = Store.init(reg)
    for seed, task in enumerate(("news", "qa")):
        _commit_without_signature(store, tiny_base_path, task, seed, composition="sum")
    (route,) = json.loads(cli_run("route", "--registry", reg, "--router", "sum", "--compositions", "sum", "--json",
                                  TOPICS).stdout)
    assert route["combine"] == "sum" and [(a["ref"], a["weight"]) for a in route["adapters"]] == [("news@1", 1.0), ("qa@1", 1.0)]
    out = cli_run("generate", "--registry", reg, "--router", "sum", "--compositions", "sum", "--max-new-tokens", "2",
                  TOPICS).output
    assert "-> news@1 (1.00), qa@1 (1.00) sum" in out and "answer:" in out
    bad = cli_run("route", "--registry", reg, "--router", "sum", TOPICS, ok=False)  # no route-composed versions
    assert bad.exit_code == 1 and "--compositions sum" in bad.output
