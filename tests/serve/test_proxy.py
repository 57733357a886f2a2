"""The routing proxy end to end: in front of two fake vLLM servers and in front of ``cladapt serve``."""

from __future__ import annotations

import json
from contextlib import ExitStack

import httpx
import openai
import pytest
from fake_vllm import SERVED, FakeVllm

from cladapt.registry.store import Store
from cladapt.serve.proxy import ProxyConfig, build_proxy, create_proxy_app, rendezvous
from cladapt.serve.running import BackgroundServer


@pytest.fixture(scope="module")
def fleet(served_registry):
    fakes = [FakeVllm(), FakeVllm()]
    with ExitStack() as stack:
        ups = [stack.enter_context(BackgroundServer(f.app())) for f in fakes]
        config = ProxyConfig(upstreams=[u.url for u in ups], router="dtkr",
                             router_config={"space": "base", "groups": 1, "keys": 5, "retrieve": 1})
        proxy = build_proxy(config, Store.open(served_registry))
        front = stack.enter_context(BackgroundServer(create_proxy_app(proxy)))
        yield front, proxy, dict(zip([u.url for u in ups], fakes, strict=True))


def _upstream_of(fleet, ref):
    _, proxy, fakes = fleet
    return fakes[rendezvous(ref, proxy.upstreams)]


def test_explicit_request_loads_exported_adapter_and_rewrites_model(fleet) -> None:
    front, proxy, fakes = fleet
    r = httpx.post(front.url + "/v1/completions", json={"model": "sentiment", "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.headers["x-cladapt-adapter"] == "sentiment@1"
    body = r.json()
    assert body["choices"][0]["text"] == "answered by sentiment@1" and body["model"] == "sentiment"
    fake = _upstream_of(fleet, "sentiment@1")
    loads = [c for c in fake.calls if c[0] == "load"]
    assert loads[0][1]["lora_name"] == "sentiment@1"
    cfg = json.loads(open(loads[0][1]["lora_path"] + "/adapter_config.json").read())
    assert cfg["base_model_name_or_path"] == SERVED  # vLLM's resolvers refuse anything else
    other = next(f for f in fakes.values() if f is not fake)
    assert "sentiment@1" not in other.loras  # affinity: loaded on one upstream only
    # a second request does not load again
    httpx.post(front.url + "/v1/completions", json={"model": "sentiment@1", "prompt": "hi"})
    assert len([c for c in fake.calls if c[0] == "load"]) == 1


def test_streaming_routed_and_base_through_the_openai_client(fleet) -> None:
    front, _, _ = fleet
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="topics", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "answered by topics@1"
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "the company does business"}])
    assert raw.headers["x-cladapt-adapter"] == "topics@1"
    assert raw.parse().model_extra["cladapt"]["route"]["adapters"][0]["ref"] == "topics@1"
    base = client.completions.create(model=SERVED, prompt="hi")
    assert base.choices[0].text == f"answered by {SERVED}"
    ids = {m.id for m in client.models.list().data}
    assert {SERVED, "sentiment", "topics", "auto"} <= ids


def test_upstream_restart_reloads_and_unknown_model_404(fleet) -> None:
    front, _, _ = fleet
    fake = _upstream_of(fleet, "news@1")
    assert httpx.post(front.url + "/v1/completions", json={"model": "news", "prompt": "x"}).status_code == 200
    fake.restart()
    r = httpx.post(front.url + "/v1/completions", json={"model": "news", "prompt": "x"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "answered by news@1"
    assert len([c for c in fake.calls if c[0] == "load" and c[1]["lora_name"] == "news@1"]) == 2
    missing = httpx.post(front.url + "/v1/completions", json={"model": "nosuch", "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["message"] == "The model `nosuch` does not exist."
    bad = httpx.post(front.url + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert bad.status_code == 400


def test_rendezvous_is_stable_and_spreads() -> None:
    ups = ["http://a:1", "http://b:1", "http://c:1"]
    keys = [f"task{i}@1" for i in range(60)]
    placed = [rendezvous(k, ups) for k in keys]
    assert placed == [rendezvous(k, ups) for k in keys] and set(placed) == set(ups)
    # adding an upstream moves only keys to the new one
    moved = [(a, rendezvous(k, [*ups, "http://d:1"])) for k, a in zip(keys, placed, strict=True)]
    assert all(new in (old, "http://d:1") for old, new in moved)


def test_proxy_in_front_of_cladapt_serve(live, served_registry) -> None:
    config = ProxyConfig(upstreams=[live.url], upstream_api_key="s3cret")
    proxy = build_proxy(config, Store.open(served_registry))
    body = {"model": "qa", "prompt": "the film was great", "max_tokens": 5, "temperature": 0}
    with BackgroundServer(create_proxy_app(proxy)) as front:
        via = httpx.post(front.url + "/v1/completions", json=body, timeout=60)
        assert via.status_code == 200, via.text
        assert via.headers["x-cladapt-adapter"] == "qa@1"
        with httpx.stream("POST", front.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
            streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                               if line.startswith("data: {") and json.loads(line[6:])["choices"])
        via_sum = httpx.post(front.url + "/v1/completions", json={**body, "model": "sum"}, timeout=60)
    direct = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
    # the upstream loaded the exported folder under the versioned name; same weights, same answer
    assert "lora:qa@1" in live.server.cache.loaded()
    assert via.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"] == streamed
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": "qa@1"}, headers=auth).status_code == 200
    # model 'sum': the proxy's one rank-concatenated adapter answers as cladapt serve's own composed sum
    direct_sum = httpx.post(live.url + "/v1/completions", json={**body, "model": "sum"}, timeout=60)
    assert via_sum.status_code == 200 and via_sum.headers["x-cladapt-adapter"].startswith("sum-"), via_sum.text
    assert via_sum.json()["choices"][0]["text"] == direct_sum.json()["choices"][0]["text"]
    assert direct_sum.headers["x-cladapt-adapter"] == "sum"
    key = via_sum.headers["x-cladapt-adapter"]
    assert httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": key}, headers=auth).status_code == 200


def test_sum_loads_one_rank_concatenated_adapter_upstream(fleet) -> None:
    front, proxy, _ = fleet
    r = httpx.post(front.url + "/v1/completions", json={"model": "sum", "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    key = r.headers["x-cladapt-adapter"]
    assert key.startswith("sum-") and r.json()["cladapt"]["route"] == {"combine": "sum", "refs": ["news@1", "qa@1"]}
    assert r.json()["choices"][0]["text"] == f"answered by {key}"
    fake = _upstream_of(fleet, key)
    path = next(c[1]["lora_path"] for c in fake.calls if c[0] == "load" and c[1]["lora_name"] == key)
    cfg = json.loads(open(path + "/adapter_config.json").read())
    assert cfg["base_model_name_or_path"] == SERVED and cfg["r"] == 8  # news r=4 + qa r=4, concatenated
    from safetensors.torch import load_file

    a = [t for n, t in load_file(path + "/adapter_model.safetensors").items() if "lora_A" in n]
    assert a and all(t.shape[0] == 8 for t in a)
    assert "sum" in {m["id"] for m in httpx.get(front.url + "/v1/models").json()["data"]}


def test_sum_without_sum_versions_is_404_naming_why(tmp_path, served_registry) -> None:
    import shutil

    reg = tmp_path / "reg"
    shutil.copytree(served_registry, reg)
    store = Store.open(reg)
    for task in ("news", "qa"):
        store.set_status(f"{task}@1", "archived", "test")
    with BackgroundServer(FakeVllm().app()) as up:
        proxy = build_proxy(ProxyConfig(upstreams=[up.url]), store)
        with BackgroundServer(create_proxy_app(proxy)) as front:
            r = httpx.post(front.url + "/v1/completions", json={"model": "sum", "prompt": "x"})
    assert r.status_code == 404 and "sum-composed" in r.json()["message"]


def _png_url() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 20, 20)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_parts_go_upstream_unchanged_and_auto_routes_on_their_text(fleet) -> None:
    front, _, _ = fleet
    content = [{"type": "image_url", "image_url": {"url": _png_url()}},
               {"type": "text", "text": "the company does business"},
               {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    r = httpx.post(front.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-cladapt-adapter"] == "topics@1"  # a text-only router base routes on the text parts
    fake = _upstream_of(fleet, "topics@1")
    sent = [c[1] for c in fake.calls if c[0] == "chat"][-1]
    assert sent["messages"][0]["content"] == content and sent["model"] == "topics@1"


def test_prompt_text_of_image_parts_on_a_vision_router() -> None:
    from cladapt.errors import DataError
    from cladapt.image_prompts import ImagePrompt
    from cladapt.serve.proxy import _prompt_text

    content = [{"type": "text", "text": "before"}, {"type": "image_url", "image_url": {"url": _png_url()}},
               {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
               {"type": "text", "text": "after"}]
    body = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": content}]}
    got = _prompt_text(body, vision=True)
    assert isinstance(got, ImagePrompt) and str(got) == "before after" and len(got.images) == 1
    assert got.parts == [("text", "before"), ("image", 0), ("text", "after")]  # the remote image is upstream's
    assert _prompt_text(body).images == [] and str(_prompt_text(body)) == "before after"
    broken = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@"}}]}]}
    with pytest.raises(DataError, match=r"messages\[0\].content\[0\].image_url.url"):
        _prompt_text(broken, vision=True)
