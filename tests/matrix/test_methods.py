"""The method matrix: every method in METHODS, end to end on the tiny model (design.md B7).

For each method, two tiny tasks are trained in sequence through ``train_task`` (forgetting methods:
two forgetting requests through ``forget_task``) into a real Store, once per module; the tests
then reload and generate, check that earlier adapters' files are byte-identical when the method
``freezes_history``, and that the exported adapter loaded by plain ``PeftModel.from_pretrained``
gives the same logits as the method's composition applied adapter by adapter. The matrix is
generated from ``METHODS.names()``: a new method joins it by itself, and a guard fails if any
method is missing or a per-method override names an unknown method.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import task_rows, tiny_overrides, write_jsonl

from cladapt.adapters import METHODS

#: per-method overrides that keep the matrix fast (default: none)
TINY: dict[str, dict[str, Any]] = {"inflora": {"method.max_batches": 2}, "gslora": {"method.eval_batches": 1}}
CASES = [pytest.param(m, id=m) for m in METHODS.names()]
PROMPTS = [[{"role": "user", "content": "What is the topic? the actor plays sports"}]]


@dataclass
class Trained:
    method: str
    store: Any
    base_path: Path
    records: list[Any]
    first_files: dict[str, str]  # relpath -> sha256 of version 1, right after it was committed
    trained_logits: torch.Tensor  # the training model at the end of task 2 (after finalize)


def _sha_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _config(method: str, base_path: Path) -> Any:
    from cladapt.config import load_config

    over = tiny_overrides(**{"train.max_steps": 2, **TINY.get(method, {})})
    return load_config(method=method, overrides=[*over, f"base_model={base_path}"])[0]


@pytest.fixture(scope="module", params=CASES)
def trained(request: pytest.FixtureRequest, tiny_base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from cladapt.base_model import load
    from cladapt.registry.store import Store
    from cladapt.train.forget import forget_task
    from cladapt.train.run import train_task

    method = request.param
    tmp = tmp_path_factory.mktemp(f"matrix-{method}")
    store = Store.init(tmp / "reg")
    data = {k: str(write_jsonl(tmp / f"{k}.jsonl", task_rows(k, 8))) for k in ("sentiment", "topics")}
    cfg = _config(method, tiny_base_path)
    loaded = load(str(tiny_base_path))
    seen: list[torch.Tensor] = []

    def capture(trained: Any) -> None:
        # the model as training left it: earlier summed adapters folded, the new one finalized
        seen.append(_logits(trained.model, loaded[1]))
        trained.model.train()

    if METHODS.get(method).forgetting:
        first = forget_task(store, "forget-topics", [data["topics"]], [data["sentiment"]], cfg, loaded=loaded)
        first_files = _sha_tree(first.path)
        second = forget_task(
            store, "forget-sentiment", [data["sentiment"]], [data["topics"]], cfg, loaded=loaded, after_train=capture
        )
    else:
        first = train_task(store, "sentiment", [data["sentiment"]], cfg, loaded=loaded)
        first_files = _sha_tree(first.path)
        second = train_task(store, "topics", [data["topics"]], cfg, loaded=loaded, after_train=capture)
    return Trained(method, store, tiny_base_path, [first, second], first_files, seen[0])


def _logits(model: Any, tok: Any) -> torch.Tensor:
    from cladapt.text.template import render

    enc = tok([render(tok, p) for p in PROMPTS], return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        return model(**enc).logits.float()


def test_two_tasks_train_commit_reload_generate(trained: Trained, tmp_path: Path) -> None:
    from cladapt.adapters.loading import attach, attach_sum
    from cladapt.base_model import load
    from cladapt.text.generation import generate

    cls = METHODS.get(trained.method)
    first, second = trained.records
    assert [r.method for r in trained.records] == [trained.method] * 2
    assert all(r.status == "active" and r.composition == cls.composition for r in trained.records)
    assert second.manifest.train_stats["steps"] == 2
    if cls.composition == "single":
        assert list(second.parents) == [f"{first.task}@{first.version}"]
    elif cls.composition == "sum":
        assert list(second.parents) == [f"{first.task}@{first.version}"]
    model, tok, info = load(str(trained.base_path))
    if cls.composition == "sum":
        model, used = attach_sum(model, trained.store, info, tmp_path / "sum")
        assert used == [f"{r.task}@{r.version}" for r in trained.records]
    else:
        model, names = attach(model, trained.store, info, [f"{r.task}@{r.version}" for r in trained.records])
        model.set_adapter(names[-1])
    answers = generate(model, tok, PROMPTS, max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_history_unchanged(trained: Trained) -> None:
    if not METHODS.get(trained.method).freezes_history:
        pytest.skip("method continues one adapter by design")
    first = trained.store.get(f"{trained.records[0].task}@{trained.records[0].version}")
    assert _sha_tree(first.path) == trained.first_files


def test_export_loads_in_plain_peft_with_same_logits(trained: Trained, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    from cladapt.adapters.compose import factors, folded
    from cladapt.adapters.loading import attach, summed_versions, write_merged
    from cladapt.base_model import load

    store = trained.store
    base, tok, info = load(str(trained.base_path))
    base_logits = _logits(base, tok)
    if METHODS.get(trained.method).composition == "sum":
        # reference: every summed version active as its own PEFT adapter
        refs = [f"{r.task}@{r.version}" for r in summed_versions(store, info)]
        ref_model, names = attach(base, store, info, refs)
        ref_model.base_model.set_adapter(names)
        reference = _logits(ref_model, tok)
        write_merged(store, summed_versions(store, info), tmp_path / "export", info.id)
        export_dir = tmp_path / "export"
    else:
        # reference: the latest version's factors folded into the base weights by hand
        rec = trained.records[-1]
        export_dir = store.adapter_dir(f"{rec.task}@{rec.version}")
        f = factors(
            load_file(str(export_dir / "adapter_model.safetensors")),
            json.loads((export_dir / "adapter_config.json").read_text()),
        )
        with folded(base, [f]):
            reference = _logits(base, tok)
    assert (reference - base_logits).abs().max() > 1e-5, "the adapters must change the model, or parity is trivial"
    fresh, _, _ = load(str(trained.base_path))
    exported = _logits(PeftModel.from_pretrained(fresh, str(export_dir)), tok)
    assert torch.allclose(exported, reference, rtol=1e-5, atol=1e-5)
    # what serving composes is what training ended with (folding, finalize's export form)
    assert torch.allclose(exported, trained.trained_logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# guards and cheap checks that need no training


def test_every_method_is_in_the_matrix() -> None:
    names = set(METHODS.names())
    assert {p.values[0] for p in CASES} == names
    assert set(TINY) <= names, f"TINY names unknown methods: {set(TINY) - names}"


@pytest.mark.parametrize("method", CASES)
def test_method_contract(method: str) -> None:
    from cladapt.config import load_config
    from cladapt.errors import ConfigError

    cls = METHODS.get(method)
    assert cls.summary, "`cladapt methods` shows the summary"
    assert cls.name in (method, ""), "the loss-term prefix must be the method's table name"
    assert cls.composition in ("route", "sum", "single")
    assert (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip(), (
        "module docstring: paper, changes, persists"
    )
    cfg, _ = load_config(method=method)  # the preset validates
    assert cfg.method.name == method
    with pytest.raises(ConfigError, match="method.lamda"):
        load_config(method=method, overrides=["method.lamda=1"])


def test_train_refuses_forgetting_methods_and_forget_refuses_others(
    tiny_base_path, tiny_loaded, store, two_tasks
) -> None:
    from cladapt.errors import CladaptError
    from cladapt.train.forget import forget_task
    from cladapt.train.run import train_task

    forgetting = [m for m in METHODS.names() if METHODS.get(m).forgetting]
    other = next(m for m in METHODS.names() if not METHODS.get(m).forgetting)
    for m in forgetting:
        with pytest.raises(CladaptError, match="removes knowledge"):
            train_task(store, "x", [str(two_tasks["topics"])], _config(m, tiny_base_path), loaded=tiny_loaded)
    with pytest.raises(CladaptError, match="not a forgetting method"):
        forget_task(
            store,
            "x",
            [str(two_tasks["topics"])],
            [str(two_tasks["sentiment"])],
            _config(other, tiny_base_path),
            loaded=tiny_loaded,
        )
    assert store.list() == []


def test_cli_methods_lists_every_method() -> None:
    from click.testing import CliRunner

    from cladapt.cli import cli

    res = CliRunner().invoke(cli, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == METHODS.names()
    olora = next(r for r in rows if r["name"] == "olora")
    assert {f["name"]: f["default"] for f in olora["config"]}["lambda1"] == 0.5
    text = CliRunner().invoke(cli, ["methods"]).output
    assert all(name in text for name in METHODS.names()) and "method.lambda1 = 0.5" in text


def test_cli_forget_end_to_end(tiny_base_path: Path, tmp_path: Path, two_tasks) -> None:
    from click.testing import CliRunner

    from cladapt.cli import cli
    from cladapt.registry.store import Store

    Store.init(tmp_path / "reg")
    over = [a for kv in tiny_overrides(**{"train.max_steps": 1, "method.eval_batches": 1}) for a in ("--set", kv)]
    args = [
        "forget",
        "--task",
        "forget-topics",
        "--forget",
        str(two_tasks["topics"]),
        "--retain",
        str(two_tasks["sentiment"]),
        "--registry",
        str(tmp_path / "reg"),
        "--base-model",
        str(tiny_base_path),
        "--prototypes",
        "--json",
        *over,
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = res.stdout
    manifest = json.loads(out[out.index('{\n  "') :])  # the trainer may log dicts before the record
    assert manifest["method"] == "gslora" and manifest["method_config"]["prototypes"] is True
    store = Store.open(tmp_path / "reg")
    info = json.loads(store.sidecar_path("forget-topics@1", "gslora.json").read_text())
    assert {"before", "after", "H", "group_norms", "classes"} <= set(info)
    assert store.sidecar_path("forget-topics@1", "gslora_protos.safetensors").is_file()
    assert json.loads(store.sidecar_path("forget-topics@1", "forget_data.json").read_text())["rows"] == 16
