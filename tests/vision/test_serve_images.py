"""Image requests to ``cladapt serve``: OpenAI ``image_url`` parts (data URLs) on tiny random VLMs.

The server's answer must equal ``cladapt generate --image``'s on the same picture and question
(greedy, with and without an adapter), parts keep their order in the rendered prompt, and bad
image parts (a remote URL, broken base64, a text-only base) get a 400 naming the part.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from cladapt.serve.app import create_app
from cladapt.serve.running import BackgroundServer

QUESTION = "What colour is the shape?"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def lora_folder(model: Any, out: Path, seed: int) -> None:
    """A random LoRA on the language model's q/v projections (non-zero B: it changes answers)."""
    from peft import LoraConfig, get_peft_model

    from cladapt.vision import language_model_path

    regex = rf"^{language_model_path(model)}\..*\.(q_proj|v_proj)$"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=regex, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.6)
    peft_model.save_pretrained(out)
    peft_model.unload()


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm_server(request: pytest.FixtureRequest, vlm_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Any]:
    from cladapt.registry.store import Store
    from cladapt.serve.server import Server, load_serve_config

    base = vlm_paths[request.param]
    store = Store.init(tmp_path_factory.mktemp("vlm-reg") / "reg")
    config = load_serve_config(base_model=str(base), served_model_name="vlm", admin_token="t", batch_window_ms=5)
    server = Server(config, store).start()
    try:
        with BackgroundServer(create_app(server)) as bg:
            bg.server, bg.base = server, base
            yield bg
    finally:
        server.close()


def _picture(tmp: Path, colour: tuple[int, int, int], shape: str = "square") -> Path:
    from tiny_vlm import write_image

    return write_image(tmp / f"{colour}-{shape}.png", colour, shape=shape)


def _expected(base: Path, image: Path | None, adapter: Path | None = None) -> str:
    """What ``cladapt generate [--image]`` answers (the library call behind it), greedy, 6 tokens."""
    from cladapt.base_model import load
    from cladapt.text.generation import generate

    model, tok, _ = load(str(base))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    conv = [{"role": "user", "content": QUESTION, **({"images": [str(image)]} if image else {})}]
    return generate(model, tok, [conv], max_new_tokens=6)[0]


def test_image_request_answers_as_generate_does(vlm_server: Any, tmp_path: Path) -> None:
    red = _picture(tmp_path, (220, 30, 30))
    body = {"model": "vlm", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(red)}}, {"type": "text", "text": QUESTION}]}]}
    r = httpx.post(vlm_server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    assert answer.strip() == _expected(vlm_server.base, red)
    assert vlm_server.server.engine.max_context == 512  # the language model's, from its text_config
    text_only = httpx.post(vlm_server.url + "/v1/chat/completions", timeout=120, json={
        **body, "messages": [{"role": "user", "content": QUESTION}]}).json()
    assert r.json()["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"]  # image tokens counted
    # a text request on the same base goes through the batched loop: the same answer as generate too
    assert text_only["choices"][0]["message"]["content"].strip() == _expected(vlm_server.base, None)
    # streamed: the same text, in pieces
    with httpx.stream("POST", vlm_server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
        import json

        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == answer


def test_image_request_with_an_adapter_matches_peft(vlm_server: Any, tmp_path: Path) -> None:
    from cladapt.base_model import load

    folder = tmp_path / "lora"
    lora_folder(load(str(vlm_server.base))[0], folder, seed=3)
    auth = {"Authorization": "Bearer t"}
    r = httpx.post(vlm_server.url + "/v1/load_lora_adapter", json={"lora_name": "pic", "lora_path": str(folder)},
                   headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    blue = _picture(tmp_path, (30, 30, 220), "circle")
    content = [{"type": "image_url", "image_url": {"url": data_url(blue)}}, {"type": "text", "text": QUESTION}]
    got = {}
    for model in ("pic", "vlm"):
        resp = httpx.post(vlm_server.url + "/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": content}]})
        assert resp.status_code == 200, resp.text
        got[model] = resp.json()["choices"][0]["message"]["content"].strip()
    assert got["pic"] == _expected(vlm_server.base, blue, folder)
    assert got["pic"] != got["vlm"]  # the adapter was applied to the image row
    httpx.post(vlm_server.url + "/v1/unload_lora_adapter", json={"lora_name": "pic"}, headers=auth, timeout=60)


def test_interleaved_parts_keep_their_order(vlm_server: Any, tmp_path: Path) -> None:
    from cladapt.serve.admission import prompt_of
    from cladapt.serve.schemas import ChatRequest

    url = data_url(_picture(tmp_path, (220, 30, 30)))
    req = ChatRequest(model="vlm", messages=[{"role": "user", "content": [
        {"type": "text", "text": "the film"}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "the plot"}]}])
    prompt = prompt_of(vlm_server.server, req)
    tok = vlm_server.server.engine.tokenizer
    image_id = tok.convert_tokens_to_ids(tok.processor.image_token)
    text = tok.decode(prompt.ids)
    first, second = text.index("the film"), text.index("the plot")
    at = [i for i, t in enumerate(prompt.ids) if t == image_id]
    assert at and first < len(tok.decode(prompt.ids[: at[0]])) <= second  # text, image, text
    assert prompt.vision and str(prompt.route_text) == "the film the plot" and len(prompt.route_text.images) == 1


@pytest.mark.parametrize(("url", "says"), [
    ("https://example.com/cat.png", "remote images are not fetched"),
    ("data:image/png;base64,@@@", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(), "not a readable image"),
    ("file:///etc/passwd", "data:image/<type>;base64"),
])
def test_bad_image_parts_are_400_naming_the_part(vlm_server: Any, url: str, says: str) -> None:
    body = {"model": "vlm", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    r = httpx.post(vlm_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[1].image_url.url" and says in err["message"]
    bad_type = {**body, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}
    r = httpx.post(vlm_server.url + "/v1/chat/completions", json=bad_type, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"
    assert httpx.get(vlm_server.url + "/health").status_code == 200  # still serving


def test_text_only_base_refuses_image_parts_by_name(tiny_base_path: Path, tmp_path: Path) -> None:
    from cladapt.registry.store import Store
    from cladapt.serve.server import Server, load_serve_config

    server = Server(load_serve_config(base_model=str(tiny_base_path), served_model_name="tiny"),
                    Store.init(tmp_path / "reg")).start()
    img = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(img, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(img.getvalue()).decode()
    try:
        with BackgroundServer(create_app(server)) as bg:
            r = httpx.post(bg.url + "/v1/chat/completions", timeout=60, json={"model": "tiny", "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    finally:
        server.close()
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[1]" and "text-only" in err["message"]
