"""Routing image requests: signatures of image rows embed image + text in the model's own space.

Two tasks ask the same question about pictures that differ systematically (red shapes vs blue
shapes). Their words are identical, so only the images can tell them apart: routers over the
model's base space (dtkr, lda) and over base + own-adapter spaces (mos) must send a new red
picture to one task and a blue one to the other, while the same queries as text alone cannot be
told apart (the control that shows the images did it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

QUESTION = "What is in the picture?"
COLOURS = {"reds": [(220, 30, 30), (190, 40, 20), (240, 60, 50)], "blues": [(30, 30, 220), (20, 50, 190), (60, 60, 240)]}


def _task_file(tmp: Path, task: str, n: int = 6) -> Path:
    from tiny_vlm import write_image

    rows = []
    for i in range(n):
        ref = f"img/{task}-{i}.png"
        write_image(tmp / ref, COLOURS[task][i % 3], shape=("square", "circle")[i % 2])
        rows.append({"instruction": QUESTION, "input": "", "image": ref, "output": task[:-1]})
    path = tmp / f"{task}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _adapter(peft_model: Any, name: str, seed: int) -> None:
    from peft import LoraConfig

    from cladapt.vision import language_model_path

    regex = rf"^{language_model_path(peft_model)}\..*\.(q_proj|v_proj)$"
    peft_model.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules=regex, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if f"lora_B.{name}." in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def routed(vlm_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """(model with two adapters, tokenizer, task views with image signatures, query pictures)."""
    from peft import LoraConfig, get_peft_model
    from tiny_vlm import write_image

    from cladapt.base_model import load
    from cladapt.data.rows import load_examples
    from cladapt.serve.routers.base import TaskView
    from cladapt.train.signatures import compute_signature
    from cladapt.vision import language_model_path

    tmp = tmp_path_factory.mktemp("image-routing")
    model, tok, info = load(str(vlm_paths["llava"]))
    regex = rf"^{language_model_path(model)}\..*\.(q_proj|v_proj)$"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=regex), adapter_name="scratch")
    views = []
    for seed, task in enumerate(("reds", "blues"), start=1):
        name = f"{task}__v1"
        _adapter(peft_model, name, seed)
        examples = load_examples([_task_file(tmp, task)]).examples
        sig = compute_signature(peft_model, tok, examples, adapter=name, seed=0, base_fingerprint=info.fingerprint)
        views.append(TaskView(ref=f"{task}@1", task=task, version=1, peft_name=name, composition="route",
                              lora={"r": 4, "target_modules": regex}, signature=sig))
    queries = {"reds": write_image(tmp / "q-red.png", (210, 45, 35), shape="circle"),
               "blues": write_image(tmp / "q-blue.png", (40, 35, 210), shape="square")}
    return {"model": peft_model, "tok": tok, "info": info, "views": views, "queries": queries,
            "base": vlm_paths["llava"], "tmp": tmp}


def test_image_signatures_hold_image_embeddings(routed: dict[str, Any]) -> None:
    reds, blues = (v.signature for v in routed["views"])
    assert reds.own is not None and blues.own is not None
    assert "encoder: the text only" in reds.to_json()["images"]  # the stored signature says what it embeds
    # the same question on different pictures: the text alone would give one vector for every row
    assert not torch.allclose(reds.base[0], blues.base[0], atol=1e-4)
    assert not torch.allclose(reds.own[0], reds.base[0], atol=1e-4)  # the own adapter changed the embedding


@pytest.mark.parametrize(("router", "settings"), [
    ("dtkr", {"space": "base", "groups": 1, "keys": 3, "retrieve": 1}),
    ("lda", {"space": "base"}),
    ("mos", {"clusters": 1}),
])
def test_routers_send_image_requests_to_the_task_their_pictures_belong_to(routed: dict[str, Any], router: str,
                                                                           settings: dict[str, Any]) -> None:
    from cladapt.features import FeatureExtractor
    from cladapt.image_prompts import ImagePrompt
    from cladapt.serve.routers import ROUTERS, QueryBatch

    model = routed["model"]
    cls = ROUTERS.get(router)
    r = cls(cls.Config(name=router, **settings))
    r.fit(routed["views"])
    features = FeatureExtractor(model, routed["tok"], adapter_loader=lambda ref: (model, ref.replace("@", "__v")))
    prompts = [ImagePrompt.images_first(QUESTION, [routed["queries"][t]]) for t in ("reds", "blues")]
    routes = r.route(QueryBatch(prompts, features))
    assert [route.task for route in routes] == ["reds", "blues"]
    text_only = r.route(QueryBatch([QUESTION, QUESTION], features))
    assert text_only[0].task == text_only[1].task  # words alone cannot separate them


def _commit(store: Any, routed: dict[str, Any], view: Any) -> None:
    """One routed version as training commits it: the PEFT folder and its image signature."""
    import shutil

    from cladapt.features import SIGNATURE_STEM

    out = routed["tmp"] / "saved"
    routed["model"].save_pretrained(out, selected_adapters=[view.peft_name])
    with store.stage(view.task) as staging:
        for f in (out / view.peft_name).iterdir():
            shutil.copy2(f, staging.adapter_dir / f.name)
        staging.write_tensors(f"{SIGNATURE_STEM}.safetensors", view.signature.tensors())
        staging.write_json(f"{SIGNATURE_STEM}.json", view.signature.to_json())
        staging.manifest_fields = {
            "method": "lora", "method_config": {}, "composition": "route", "base_model": routed["info"].as_dict(),
            "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": view.lora["target_modules"]},
            "data": {"files": [f"{view.task}.jsonl"], "sha256": "ab" * 32, "rows": 6},
            "config": {"seed": 0}, "seed": 0, "parents": [], "train_stats": {"steps": 1}, "metrics": {},
        }
        store.commit(staging, status="active")


def test_server_routes_image_requests_by_their_pictures(routed: dict[str, Any]) -> None:
    """`cladapt serve --router dtkr --router-set space=base` over HTTP: model auto, same words, two pictures."""
    import base64

    import httpx

    from cladapt.registry.store import Store
    from cladapt.serve.app import create_app
    from cladapt.serve.running import BackgroundServer
    from cladapt.serve.server import Server, load_serve_config

    store = Store.init(routed["tmp"] / "reg")
    for view in routed["views"]:
        _commit(store, routed, view)
    config = load_serve_config(base_model=str(routed["base"]), router="dtkr",
                               router_config={"space": "base", "groups": 1, "keys": 3, "retrieve": 1})
    server = Server(config, store).start()
    got = {}
    try:
        with BackgroundServer(create_app(server)) as bg:
            for task, path in routed["queries"].items():
                url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
                r = httpx.post(bg.url + "/v1/chat/completions", timeout=120, json={
                    "model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]})
                assert r.status_code == 200, r.text
                got[task] = r.headers["x-cladapt-adapter"]
    finally:
        server.close()
    assert got == {"reds": "reds@1", "blues": "blues@1"}
