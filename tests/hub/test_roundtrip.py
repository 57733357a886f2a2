"""Push a registry to the fake Hub and pull it back: same tensors, same manifests, lineage kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hub_helpers import BASE_ID, add_version

from cladapt.errors import Conflict, RegistryError
from cladapt.registry import Store
from cladapt.registry.hub import pull, push
from cladapt.registry.hub_import import manifest_fields

REPO = "org/support-adapters"


def _card_meta(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_push_all_lays_out_peft_folders_cards_and_index(hub_env: Any, src_store: Store) -> None:
    res = push(src_store, REPO, base_model_id=BASE_ID)
    files = hub_env.head_files(REPO)
    for folder in ("sentiment__v1", "sentiment__v2", "topics__v1"):
        config = json.loads(files[f"{folder}/adapter_config.json"])
        assert config["base_model_name_or_path"] == BASE_ID  # the Hub id, never the local path
        assert f"{folder}/adapter_model.safetensors" in files
        assert f"{folder}/cladapt/manifest.json" in files and f"{folder}/cladapt/sidecars/basis.safetensors" in files
        meta = _card_meta(files[f"{folder}/README.md"].decode())
        assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == "adapter"
        assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
        assert {"lora", "peft", "cladapt", "inc-lora"} <= set(meta["tags"])
    assert "topics__v1/cladapt/evals/eval-topics.json" in files
    assert "policy.json" in files and any(p.startswith("shared/gere/") for p in files)
    card = files["README.md"].decode()
    meta = _card_meta(card)
    scores = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
    assert scores == {"sentiment": 60.0, "topics": 75.0}  # the active versions' own scores
    assert "| `topics__v1` | topics | 1 | active | inc-lora | 4 | sentiment@2 | 75.00 |" in card
    version_card = files["topics__v1/README.md"].decode()
    sha = src_store.get("topics@1").manifest.file("adapter/adapter_model.safetensors").sha256
    assert sha in version_card and "sentiment@2" in version_card and 'subfolder="topics__v1"' in version_card
    assert "/data/topics.jsonl" not in version_card  # local paths stay local; the card names the file
    # one commit (create + one commit), and the index lists every pushed file's sha256
    assert len(hub_env.commit_bodies) == 1 and res.commit == hub_env.repos[REPO].branches["main"]
    index = json.loads(files["cladapt-hub.json"])
    assert {v["ref"] for v in index["versions"]} == {"sentiment@1", "sentiment@2", "topics@1"}


def test_round_trip_is_bit_exact_and_keeps_lineage(hub_env: Any, src_store: Store, tmp_path: Path, tiny_base_path: Path) -> None:
    push(src_store, REPO, base_model_id=BASE_ID)
    dst = Store.init(tmp_path / "dst")
    res = pull(dst, REPO)
    assert sorted((v.remote, v.local, v.action) for v in res.versions) == [
        ("sentiment@1", "sentiment@1", "imported"), ("sentiment@2", "sentiment@2", "imported"), ("topics@1", "topics@1", "imported")]
    for ref in ("sentiment@1", "sentiment@2", "topics@1"):
        a, b = src_store.get(ref), dst.get(ref)
        assert a.status == b.status and a.parents == b.parents
        assert manifest_fields(a.manifest) == manifest_fields(b.manifest)
        for name in ("adapter/adapter_model.safetensors", "sidecars/basis.safetensors", "sidecars/state.json"):
            assert (a.path / name).read_bytes() == (b.path / name).read_bytes()
        assert json.loads((b.path / "adapter/adapter_config.json").read_bytes())["base_model_name_or_path"] == BASE_ID
    assert dst.evaluations("topics@1") == {"eval-topics": {"score": 75.0, "n": 16}}
    assert dst.get_policy() == {"min_score": 10}
    fp = src_store.get("topics@1").base_fingerprint
    assert json.loads((dst.read_shared("gere", fp) / "records.json").read_bytes()) == {"mean": [0.1, 0.2]}
    assert dst.verify() == []
    assert any("pulled from org/support-adapters@" in e.get("reason", "") for e in dst.audit_log())
    # the same logits through PEFT from both registries
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 17, 33]])
    logits = []
    for store in (src_store, dst):
        base = AutoModelForCausalLM.from_pretrained(tiny_base_path)
        model = PeftModel.from_pretrained(base, store.adapter_dir("topics@1"))
        logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_second_push_uploads_only_what_changed_and_second_pull_only_what_is_new(
    hub_env: Any, src_store: Store, tmp_path: Path, lora_template: Path, tiny_info: Any
) -> None:
    push(src_store, REPO, base_model_id=BASE_ID)
    dst = Store.init(tmp_path / "dst")
    pull(dst, REPO)
    again = push(src_store, REPO, base_model_id=BASE_ID)
    assert again.uploads == [] and again.deletes == [] and len(hub_env.commit_bodies) == 1  # no empty commit
    add_version(src_store, lora_template, tiny_info, "topics", seed=4, parents=("sentiment@2",), score=80.0)
    third = push(src_store, REPO, base_model_id=BASE_ID)
    changed = {u.path for u in third.uploads}
    assert {p for p in changed if not p.startswith("topics__v2/")} == {"README.md", "cladapt-hub.json", "topics__v1/README.md"}
    sent = [line["value"]["path"] for line in hub_env.commit_bodies[-1][1:]]
    assert sorted(sent) == sorted(changed)  # only those bytes went over the wire
    res = pull(dst, REPO)
    assert [(v.remote, v.local) for v in res.imported] == [("topics@2", "topics@2")]
    assert dst.get("topics@1").status == "archived" and dst.get("topics@2").status == "active"


def test_dry_run_lists_files_and_writes_nothing(hub_env: Any, src_store: Store) -> None:
    res = push(src_store, REPO, base_model_id=BASE_ID, dry_run=True)
    assert res.dry_run and res.commit is None
    assert "sentiment__v1/adapter_model.safetensors" in {u.path for u in res.uploads}
    assert REPO not in hub_env.repos


def test_concurrent_push_is_refused_cleanly(hub_env: Any, src_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    push(src_store, "org/one", "sentiment@1", base_model_id=BASE_ID)
    real = HfApi.list_repo_tree

    def racing(self: HfApi, *args: Any, **kwargs: Any) -> Any:
        yield from real(self, *args, **kwargs)
        hub_env.put_raw("org/one", "NOTES.md", b"someone else pushed meanwhile")

    monkeypatch.setattr(HfApi, "list_repo_tree", racing)
    before = dict(hub_env.repos["org/one"].commits)
    with pytest.raises(Conflict, match="changed while pushing"):
        push(src_store, "org/one", "sentiment@2", base_model_id=BASE_ID)
    new = set(hub_env.repos["org/one"].commits) - set(before)
    assert [hub_env.repos["org/one"].commits[c].message for c in new] == ["raw NOTES.md"]  # ours wrote nothing


def test_local_base_path_needs_a_hub_id(hub_env: Any, src_store: Store) -> None:
    with pytest.raises(RegistryError, match="has no Hub id") as err:
        push(src_store, REPO)
    assert "--base-model-id" in (err.value.hint or "")
    assert REPO not in hub_env.repos


def test_tags_and_revisions_pin_what_is_pulled(hub_env: Any, src_store: Store, tmp_path: Path, lora_template: Path, tiny_info: Any) -> None:
    first = push(src_store, REPO, base_model_id=BASE_ID, tag="v1")
    add_version(src_store, lora_template, tiny_info, "sentiment", seed=9, parents=("sentiment@2",))
    push(src_store, REPO, base_model_id=BASE_ID)
    with pytest.raises(Conflict):
        push(src_store, REPO, base_model_id=BASE_ID, tag="v1")  # tags are immutable
    by_tag = Store.init(tmp_path / "by-tag")
    assert {v.remote for v in pull(by_tag, REPO, revision="v1").versions} == {"sentiment@1", "sentiment@2", "topics@1"}
    by_sha = Store.init(tmp_path / "by-sha")
    assert pull(by_sha, REPO, revision=first.commit).commit == first.commit
    only = Store.init(tmp_path / "only")
    res = pull(only, REPO, tasks=["topics"])
    assert {v.remote for v in res.versions} == {"sentiment@1", "sentiment@2", "topics@1"}  # topics and its ancestors
    branch = push(src_store, "org/one", "sentiment@3", base_model_id=BASE_ID, revision="dev")
    assert hub_env.repos["org/one"].branches["dev"] == branch.commit and "main" in hub_env.repos["org/one"].branches


def test_pull_checks_the_base_model_fingerprint(hub_env: Any, src_store: Store, tmp_path: Path, tiny_base_path: Path) -> None:
    import shutil

    from cladapt.errors import IncompatibleBaseModel

    push(src_store, REPO, base_model_id=BASE_ID)
    other = tmp_path / "other-base"
    shutil.copytree(tiny_base_path, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6}))
    dst = Store.init(tmp_path / "dst")
    with pytest.raises(IncompatibleBaseModel, match="3 version\\(s\\) were trained on another base model"):
        pull(dst, REPO, base_model=str(other))
    assert dst.list() == []
    assert len(pull(dst, REPO, base_model=str(tiny_base_path)).imported) == 3


def test_a_version_removed_locally_is_deleted_in_the_next_push(hub_env: Any, src_store: Store) -> None:
    push(src_store, REPO, base_model_id=BASE_ID)
    hub_env.put_raw(REPO, "LICENSE", b"MIT")  # the owner's own file
    src_store.remove("topics@1")
    res = push(src_store, REPO, base_model_id=BASE_ID)
    assert res.deletes and all(p.startswith("topics__v1/") for p in res.deletes)
    files = hub_env.head_files(REPO)
    assert not any(p.startswith("topics__v1/") for p in files) and "LICENSE" in files
    assert "topics@1" not in files["cladapt-hub.json"].decode()


def test_single_version_pull_records_the_lineage_it_cannot_bring(hub_env: Any, src_store: Store, tmp_path: Path) -> None:
    push(src_store, "org/one", "topics@1", base_model_id=BASE_ID)
    files = hub_env.head_files("org/one")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "cladapt/manifest.json"} <= set(files)
    assert not any("__v" in p for p in files)  # a plain PEFT repo at the root
    dst = Store.init(tmp_path / "dst")
    (got,) = pull(dst, "org/one").versions
    assert (got.remote, got.local, got.action) == ("topics@1", "topics@1", "imported")
    assert "parents not in the repo: sentiment@2" in got.reason
    assert dst.get("topics@1").parents == ()
    assert any("original parents sentiment@2" in e.get("reason", "") for e in dst.audit_log())
