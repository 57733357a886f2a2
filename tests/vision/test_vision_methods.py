"""The method matrix on a tiny LLaVA: every CL method trains two image tasks in sequence.

As ``tests/matrix/test_methods.py`` does for text, per method: two tasks of image rows (the
shape's colour, then its form; forgetting methods: two forgetting requests), earlier versions'
files unchanged when the method freezes history, and the exported adapter loaded by plain
``PeftModel.from_pretrained`` on a fresh base gives, on an image prompt, the logits of the
method's own composition and of the model training ended with. LoRA sits on the language model
only (the default scope), so methods see the same modules as on a text base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides
from test_families import image_logits
from vision_helpers import image_task_rows, write_rows

from cladapt.adapters import METHODS

FAMILY = "llava"
TINY: dict[str, dict[str, Any]] = {"inflora": {"method.max_batches": 2}, "gslora": {"method.eval_batches": 1}}
CASES = [pytest.param(m, id=m) for m in METHODS.names()]


@dataclass
class Trained:
    method: str
    store: Any
    base_path: Path
    records: list[Any]
    first_files: dict[str, str]
    trained_logits: torch.Tensor
    prompt: list[dict[str, Any]]


def _sha_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=CASES)
def trained(request: pytest.FixtureRequest, vlm_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from cladapt.base_model import load
    from cladapt.config import load_config
    from cladapt.data.rows import load_examples
    from cladapt.registry.store import Store
    from cladapt.train.forget import forget_task
    from cladapt.train.run import train_task

    method, base = request.param, vlm_paths[FAMILY]
    tmp = tmp_path_factory.mktemp(f"vision-matrix-{method}")
    store = Store.init(tmp / "reg")
    data = {k: str(write_rows(tmp / f"{k}.jsonl", image_task_rows(k, tmp, chat=k == "shape"))) for k in ("colour", "shape")}
    over = tiny_overrides(**{"train.max_steps": 2, "train.max_length": 128, **TINY.get(method, {})})
    cfg = load_config(method=method, overrides=[*over, f"base_model={base}"])[0]
    loaded = load(str(base))
    prompt = load_examples([data["shape"]]).examples[1].prompt_messages
    seen: list[torch.Tensor] = []

    def capture(trained: Any) -> None:
        seen.append(image_logits(trained.model, loaded[1], prompt))
        trained.model.train()

    if METHODS.get(method).forgetting:
        first = forget_task(store, "forget-shape", [data["shape"]], [data["colour"]], cfg, loaded=loaded)
        first_files = _sha_tree(first.path)
        second = forget_task(store, "forget-colour", [data["colour"]], [data["shape"]], cfg, loaded=loaded, after_train=capture)
    else:
        first = train_task(store, "colour", [data["colour"]], cfg, loaded=loaded)
        first_files = _sha_tree(first.path)
        second = train_task(store, "shape", [data["shape"]], cfg, loaded=loaded, after_train=capture)
    return Trained(method, store, base, [first, second], first_files, seen[0], prompt)


def test_two_image_tasks_commit_with_language_model_targets(trained: Trained) -> None:
    cls = METHODS.get(trained.method)
    assert [r.method for r in trained.records] == [trained.method] * 2
    assert all(r.status == "active" and r.composition == cls.composition for r in trained.records)
    assert trained.records[1].manifest.train_stats["steps"] == 2
    for r in trained.records:
        cfg = json.loads((trained.store.adapter_dir(f"{r.task}@{r.version}") / "adapter_config.json").read_text())
        assert cfg["target_modules"].startswith(r"^model\.language_model\.")
    if cls.freezes_history:
        first = trained.records[0]
        assert _sha_tree(trained.store.get(f"{first.task}@{first.version}").path) == trained.first_files


def test_export_in_plain_peft_matches_composition_and_training(trained: Trained, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    from cladapt.adapters.compose import factors, folded
    from cladapt.adapters.loading import attach, summed_versions, write_merged
    from cladapt.base_model import load

    store = trained.store
    base, tok, info = load(str(trained.base_path))
    base_logits = image_logits(base, tok, trained.prompt)
    if METHODS.get(trained.method).composition == "sum":
        refs = [f"{r.task}@{r.version}" for r in summed_versions(store, info)]
        ref_model, names = attach(base, store, info, refs)
        ref_model.base_model.set_adapter(names)
        reference = image_logits(ref_model, tok, trained.prompt)
        write_merged(store, summed_versions(store, info), tmp_path / "export", info.id)
        export_dir = tmp_path / "export"
        assert isinstance(json.loads((export_dir / "adapter_config.json").read_text())["target_modules"], str)
    else:
        rec = trained.records[-1]
        export_dir = store.adapter_dir(f"{rec.task}@{rec.version}")
        f = factors(load_file(str(export_dir / "adapter_model.safetensors")),
                    json.loads((export_dir / "adapter_config.json").read_text()))
        with folded(base, [f]):
            reference = image_logits(base, tok, trained.prompt)
    assert (reference - base_logits).abs().max() > 1e-5
    fresh, _, _ = load(str(trained.base_path))
    exported = image_logits(PeftModel.from_pretrained(fresh, str(export_dir)), tok, trained.prompt)
    assert torch.allclose(exported, reference, rtol=1e-5, atol=1e-5)
    assert torch.allclose(exported, trained.trained_logits, rtol=1e-5, atol=1e-5)


def test_every_method_is_in_the_vision_matrix() -> None:
    assert {p.values[0] for p in CASES} == set(METHODS.names())
